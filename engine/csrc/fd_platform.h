/* Portability layer for the FlashDesk C kernels: aligned allocation, threads, a monotonic clock.
 *
 * Plain C11 plus POSIX or Win32, so the same sources build with gcc, clang and MSVC. Kept tiny on
 * purpose: the kernels need "run this function on N threads and wait", nothing more.
 */
#ifndef FD_PLATFORM_H
#define FD_PLATFORM_H

#include <stddef.h>
#include <stdint.h>

#if defined(_MSC_VER)
#define FD_INLINE static __forceinline
#else
#define FD_INLINE static inline __attribute__((always_inline))
#endif

/* 64-byte aligned allocation (a cache line; also what AVX-512 loads like). From 4 MiB on Linux:
 * 2 MiB aligned and advised for transparent huge pages (fd_advise_hugepages). */
void *fd_aligned_alloc(size_t nbytes);
/* Ask the OS (Linux: madvise MADV_HUGEPAGE) to back the 2 MiB-aligned interior of [p, p+nbytes)
 * with huge pages when it is first touched: streaming many weight rows at once costs a TLB miss
 * per 4 KiB page otherwise. Returns the bytes advised (0: not supported or refused). */
size_t fd_advise_hugepages(void *p, size_t nbytes);

/* Ask the OS to start reading the pages of [p, p+nbytes) in (POSIX madvise MADV_WILLNEED,
 * Windows PrefetchVirtualMemory): a memory-mapped expert needed soon is paged in from disk while
 * other work runs. On POSIX only the pages mincore reports absent are asked for. Returns the
 * bytes advised (0: all resident, not supported or refused). */
size_t fd_prefetch_pages(const void *p, size_t nbytes);
void fd_aligned_free(void *p);

/* Seconds from an arbitrary origin, monotonic, sub-microsecond resolution. */
double fd_now(void);

/* Number of logical processors the OS reports online. */
int fd_logical_cores(void);

/* Run fn(arg_i) for i in [0, n) on n threads (the caller's thread runs i == 0) and wait for all.
 * Returns 0 on success, -1 if a thread could not be started (the work is then run serially). */
typedef void (*fd_task_fn)(void *arg);
int fd_run_parallel(fd_task_fn fn, void *args, size_t arg_size, int n);

/* Word-sized atomics and a spin hint, for the persistent pool and the kernels' work counters. */
#if defined(_MSC_VER)
#include <intrin.h>
typedef volatile long fd_atomic_int;
#define fd_atomic_load(p) _InterlockedOr((p), 0)
#define fd_atomic_store(p, v) ((void)_InterlockedExchange((p), (long)(v)))
#define fd_atomic_add(p, v) (_InterlockedExchangeAdd((p), (long)(v)) + (long)(v))
#define fd_atomic_cas(p, e, d) (_InterlockedCompareExchange((p), (long)(d), (long)(e)) == (long)(e))
#if defined(_M_X64) || defined(_M_IX86)
#define fd_cpu_relax() _mm_pause()
#else
#define fd_cpu_relax() __yield()
#endif
#else
/* Sequentially consistent, as the Interlocked calls above are: the pool closes a job by storing
 * open = 0 and then reading active, while a worker adds itself to active and then reads open
 * (a store-then-load handshake on each side). With release stores and acquire loads both reads
 * may see the old values (x86 lets a plain store wait in the store buffer past a later load):
 * the caller returns while a worker enters the job, whose context then lies on a dead stack.
 * That crashed a test run once (SIGFPE in a pool worker). */
typedef long fd_atomic_int;
#define fd_atomic_load(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define fd_atomic_store(p, v) __atomic_store_n((p), (long)(v), __ATOMIC_SEQ_CST)
#define fd_atomic_add(p, v) __atomic_add_fetch((p), (long)(v), __ATOMIC_SEQ_CST)
#define fd_atomic_cas(p, e, d) __sync_bool_compare_and_swap((p), (long)(e), (long)(d))
#if defined(__x86_64__) || defined(__i386__)
#define fd_cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define fd_cpu_relax() __asm__ __volatile__("yield")
#else
#define fd_cpu_relax() ((void)0)
#endif
#endif

/* Give the rest of this time slice to another thread (spin loops fall back to this). */
void fd_yield(void);

/* A persistent pool: worker threads are created once and wait between jobs (spinning briefly, then
 * sleeping), so a kernel call costs microseconds to dispatch, not a thread start per call.
 *
 * fd_pool_run runs fn(ctx, tid, nthreads) on the caller (tid 0) and on as many of the workers
 * (tids 1..nthreads-1) as join while the caller is still working, and returns when the caller and
 * every worker that joined have finished. A worker that is slow to wake skips the job, so fn must
 * share its work dynamically (e.g. an atomic counter of units), never by tid. Calls from several
 * OS threads are serialised. Returns nthreads clipped to [1, FD_POOL_MAX_THREADS] (fewer if
 * workers could not be started). */
#define FD_POOL_MAX_THREADS 256
typedef void (*fd_job_fn)(void *ctx, int tid, int nthreads);
int fd_pool_run(fd_job_fn fn, void *ctx, int nthreads);
/* Wake sleeping workers and keep them spinning for `seconds` (at most 1) even without a job: a
 * caller that knows a job is coming after a wait (a GPU decode step's host-expert layer, while the
 * GPU finishes the layers before it) hides the workers' wake-up latency inside that wait. */
void fd_pool_keep_awake(double seconds);

#endif
