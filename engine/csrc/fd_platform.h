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

/* 64-byte aligned allocation (a cache line; also what AVX-512 loads like). */
void *fd_aligned_alloc(size_t nbytes);
void fd_aligned_free(void *p);

/* Seconds from an arbitrary origin, monotonic, sub-microsecond resolution. */
double fd_now(void);

/* Number of logical processors the OS reports online. */
int fd_logical_cores(void);

/* Run fn(arg_i) for i in [0, n) on n threads (the caller's thread runs i == 0) and wait for all.
 * Returns 0 on success, -1 if a thread could not be started (the work is then run serially). */
typedef void (*fd_task_fn)(void *arg);
int fd_run_parallel(fd_task_fn fn, void *args, size_t arg_size, int n);

#endif
