/* The persistent thread pool behind every multi-threaded kernel (see fd_platform.h).
 *
 * Workers spin for FD_SPIN_SECONDS after each job (a decode step calls the kernels several times
 * per layer, under a millisecond apart), then sleep on a condition variable so an idle app costs
 * no CPU. One job runs at a time; callers from several OS threads queue on run_lock.
 *
 * A job never waits for a worker that has not started on it: on a busy desktop a woken worker may
 * get its core milliseconds later. The caller works through the job's units itself, then closes
 * the job and waits only for workers already inside it ("active"); a worker that arrives after the
 * close skips the job without touching it. Jobs therefore hand out work dynamically and must not
 * assume that all nthreads run.
 */
#include <stdlib.h>

#include "fd_platform.h"

#if defined(_WIN32)
#define WIN32_LEAN_AND_MEAN
#include <process.h>
#include <windows.h>
typedef SRWLOCK fd_mutex;
typedef CONDITION_VARIABLE fd_cond;
#define fd_mutex_init(m) InitializeSRWLock(m)
#define fd_mutex_lock(m) AcquireSRWLockExclusive(m)
#define fd_mutex_unlock(m) ReleaseSRWLockExclusive(m)
#define fd_cond_init(c) InitializeConditionVariable(c)
#define fd_cond_wait(c, m) SleepConditionVariableSRW((c), (m), INFINITE, 0)
#define fd_cond_broadcast(c) WakeAllConditionVariable(c)
#else
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
typedef pthread_mutex_t fd_mutex;
typedef pthread_cond_t fd_cond;
#define fd_mutex_init(m) pthread_mutex_init((m), NULL)
#define fd_mutex_lock(m) pthread_mutex_lock(m)
#define fd_mutex_unlock(m) pthread_mutex_unlock(m)
#define fd_cond_init(c) pthread_cond_init((c), NULL)
#define fd_cond_wait(c, m) pthread_cond_wait((c), (m))
#define fd_cond_broadcast(c) pthread_cond_broadcast(c)
#endif

/* Seconds a worker spins for the next job before it sleeps: longer than the gaps between the
 * kernel calls of a decode step (a few per layer, torch's own ops between them), since waking a
 * sleeping worker costs far more than the spin (dev VM: a 1.5 ms FP8 linear after a 5 ms gap took
 * 1.9 ms), yet short enough that an idle app costs no CPU. */
#ifndef FD_SPIN_SECONDS
#define FD_SPIN_SECONDS 0.002
#endif
/* Spin iterations before a waiting caller starts yielding its time slice. */
#define FD_SPIN_BEFORE_YIELD 2000

typedef struct {
    fd_mutex lock;      /* guards generation changes for sleepers */
    fd_cond wake;
    fd_mutex run_lock;  /* one job at a time */
    int initialised;
    int nworkers;       /* started worker threads (tids 1..nworkers) */
    fd_atomic_int generation;
    fd_atomic_int open;   /* 1 while the current job admits workers */
    fd_atomic_int active; /* workers inside the current job */
    fd_atomic_int sleepers;
    fd_atomic_int awake_until_ms; /* fd_pool_keep_awake's deadline, ms since t0 (0: none) */
    fd_atomic_int wake_epoch;     /* bumped to wake sleepers without a job */
    double t0;
    fd_job_fn fn;
    void *ctx;
    int job_threads;
#if !defined(_WIN32)
    pid_t owner_pid;    /* threads do not survive fork(): a child starts a fresh pool */
#endif
} fd_pool;

static fd_pool g_pool;

#if defined(_WIN32)
static INIT_ONCE g_pool_once = INIT_ONCE_STATIC_INIT;
static BOOL CALLBACK fd_pool_init_once(PINIT_ONCE once, PVOID param, PVOID *ctx) {
    (void)once;
    (void)param;
    (void)ctx;
    fd_mutex_init(&g_pool.lock);
    fd_mutex_init(&g_pool.run_lock);
    fd_cond_init(&g_pool.wake);
    g_pool.t0 = fd_now();
    g_pool.initialised = 1;
    return TRUE;
}
static void fd_pool_init(void) { InitOnceExecuteOnce(&g_pool_once, fd_pool_init_once, NULL, NULL); }
#else
static pthread_once_t g_pool_once = PTHREAD_ONCE_INIT;
static void fd_pool_init_once(void) {
    fd_mutex_init(&g_pool.lock);
    fd_mutex_init(&g_pool.run_lock);
    fd_cond_init(&g_pool.wake);
    g_pool.t0 = fd_now();
    g_pool.owner_pid = getpid();
    g_pool.initialised = 1;
}
static void fd_pool_init(void) { pthread_once(&g_pool_once, fd_pool_init_once); }
#endif

void fd_yield(void) {
#if defined(_WIN32)
    SwitchToThread();
#else
    sched_yield();
#endif
}

/* Milliseconds since the pool was made (1-based: 0 means no deadline); ms, not µs, because a
 * Windows long is 32 bits (24 days of uptime in ms). */
static long fd_pool_ms(void) { return (long)((fd_now() - g_pool.t0) * 1000.0) + 1; }

/* `seen` is the generation when the worker was created (read under run_lock by its creator): the
 * job that follows must not be missed if it is published before the thread first runs. */
static void fd_pool_worker(int tid, long seen) {
    for (;;) {
        long gen;
        int spins = 0;
        double idle_since = 0.0;
        while ((gen = fd_atomic_load(&g_pool.generation)) == seen) {
            if (++spins == 1) idle_since = fd_now();
            if ((spins & 255) || fd_now() - idle_since < FD_SPIN_SECONDS ||
                fd_pool_ms() < fd_atomic_load(&g_pool.awake_until_ms)) {
                fd_cpu_relax();
                continue;
            }
            fd_mutex_lock(&g_pool.lock);
            fd_atomic_add(&g_pool.sleepers, 1);
            const long epoch = fd_atomic_load(&g_pool.wake_epoch);
            while (fd_atomic_load(&g_pool.generation) == seen &&
                   fd_atomic_load(&g_pool.wake_epoch) == epoch)
                fd_cond_wait(&g_pool.wake, &g_pool.lock);
            fd_atomic_add(&g_pool.sleepers, -1);
            fd_mutex_unlock(&g_pool.lock);
            spins = 0;
        }
        (void)gen;
        fd_atomic_add(&g_pool.active, 1);
        if (fd_atomic_load(&g_pool.open)) {
            /* Inside a job: it cannot close, nor a new one open, until active drops again. */
            seen = fd_atomic_load(&g_pool.generation);
            const int n = g_pool.job_threads;
            if (tid < n) g_pool.fn(g_pool.ctx, tid, n);
        } else {
            seen = fd_atomic_load(&g_pool.generation); /* woke too late: that job is over */
        }
        fd_atomic_add(&g_pool.active, -1);
    }
}

typedef struct {
    int tid;
    long seen;
} fd_worker_start;

static void fd_pool_thread_body(void *p) {
    fd_worker_start start = *(fd_worker_start *)p;
    free(p);
    fd_pool_worker(start.tid, start.seen);
}

#if defined(_WIN32)
static unsigned __stdcall fd_pool_thread_main(void *p) {
    fd_pool_thread_body(p);
    return 0;
}
#else
static void *fd_pool_thread_main(void *p) {
    fd_pool_thread_body(p);
    return NULL;
}
#endif

static int fd_pool_start_thread(int tid) {
    fd_worker_start *start = (fd_worker_start *)malloc(sizeof *start);
    if (!start) return -1;
    start->tid = tid;
    start->seen = fd_atomic_load(&g_pool.generation);
#if defined(_WIN32)
    HANDLE h = (HANDLE)_beginthreadex(NULL, 0, fd_pool_thread_main, start, 0, NULL);
    if (!h) {
        free(start);
        return -1;
    }
    CloseHandle(h);
    return 0;
#else
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int rc = pthread_create(&t, &attr, fd_pool_thread_main, start);
    pthread_attr_destroy(&attr);
    if (rc != 0) free(start);
    return rc == 0 ? 0 : -1;
#endif
}

void fd_pool_keep_awake(double seconds) {
    fd_pool_init();
    if (!(seconds > 0.0)) return;
    if (seconds > 1.0) seconds = 1.0;
    const long until = fd_pool_ms() + (long)(seconds * 1000.0 + 0.5);
    if (until > fd_atomic_load(&g_pool.awake_until_ms)) fd_atomic_store(&g_pool.awake_until_ms, until);
    if (fd_atomic_load(&g_pool.sleepers) > 0) {
        fd_mutex_lock(&g_pool.lock);
        fd_atomic_add(&g_pool.wake_epoch, 1);
        fd_cond_broadcast(&g_pool.wake);
        fd_mutex_unlock(&g_pool.lock);
    }
}

int fd_pool_run(fd_job_fn fn, void *ctx, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    if (nthreads > FD_POOL_MAX_THREADS) nthreads = FD_POOL_MAX_THREADS;
    fd_pool_init();
    fd_mutex_lock(&g_pool.run_lock);
#if !defined(_WIN32)
    if (g_pool.owner_pid != getpid()) { /* forked child: the parent's workers are not here */
        g_pool.owner_pid = getpid();
        g_pool.nworkers = 0;
        g_pool.sleepers = 0;
        g_pool.active = 0;
        g_pool.open = 0;
    }
#endif
    while (g_pool.nworkers < nthreads - 1) {
        if (fd_pool_start_thread(g_pool.nworkers + 1) != 0) break;
        g_pool.nworkers++;
    }
    if (nthreads > g_pool.nworkers + 1) nthreads = g_pool.nworkers + 1;
    if (nthreads == 1) {
        fn(ctx, 0, 1);
        fd_mutex_unlock(&g_pool.run_lock);
        return 1;
    }
    g_pool.fn = fn;
    g_pool.ctx = ctx;
    g_pool.job_threads = nthreads;
    fd_atomic_store(&g_pool.open, 1);
    fd_mutex_lock(&g_pool.lock);
    fd_atomic_add(&g_pool.generation, 1);
    if (fd_atomic_load(&g_pool.sleepers) > 0) fd_cond_broadcast(&g_pool.wake);
    fd_mutex_unlock(&g_pool.lock);
    fn(ctx, 0, nthreads);
    fd_atomic_store(&g_pool.open, 0);
    int spins = 0;
    while (fd_atomic_load(&g_pool.active) > 0) {
        if (++spins < FD_SPIN_BEFORE_YIELD)
            fd_cpu_relax();
        else
            fd_yield();
    }
    fd_mutex_unlock(&g_pool.run_lock);
    return nthreads;
}
