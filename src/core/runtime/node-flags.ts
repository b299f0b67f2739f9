/**
 * V8 flags every Carryon process runs with (the `carryon` launcher's shebang passes the same).
 *
 * A 32 MiB young generation: a transfer keeps tens of MiB of chunk buffers in flight, and with
 * V8's default (16 MiB) they outlive young collections and churn full GCs — measured on a 4 GiB
 * check-out: 13 s of CPU in the laptop process instead of 6.
 *
 * A fixed heap growing factor of 3: V8 starts incremental marking whenever the old generation's
 * headroom (limit − size) is smaller than the young generation, and with its own factor for a
 * ≈ 30 MiB heap the headroom stays below 32–64 MiB after every full GC: ≈ 10 full GCs a second
 * for the whole transfer, at random (half the runs). Measured, 3 runs each, --trace-gc: 33–170
 * mark-compacts and 4.4–12.8 s of laptop CPU without it, 6–7 and 4.2–4.4 s with it. The heap
 * may now grow to 3× its live size (tens of MiB here: chunk data lives in buffers, not the heap).
 *
 * The flags cannot be set after start (v8.setFlagsFromString does not resize the heap).
 */
export const NODE_FLAGS = ['--max-semi-space-size=32', '--heap-growing-percent=200'] as const;

/**
 * The environment every Carryon process starts with (the launcher's shebang sets it; processes
 * Carryon spawns inherit it): glibc's malloc backs its heaps and large blocks with transparent huge
 * pages where the kernel offers them on request (`madvise` mode, Debian's default).
 *
 * Why: a page touched for the first time costs a fault, and on virtual machines whose freed pages
 * go back to the host (free page reporting, as on this project's VMs) it costs ≈ 11 µs per 4 KiB:
 * 64 MiB touched took 270 ms here, 25 ms in huge pages. Every command touches fresh memory: the
 * vault key's scrypt alone (2^17, 128 MiB) faulted 32,800 pages (590 → 260–470 ms), and the
 * chunk buffers that Node's ciphers, zstd and TLS allocate faulted 117,000 pages in one
 * `carryon checkout` after 1 % changed (2.3–2.5 → 1.8–2.2 s, 3.2–3.6 → 2.2–2.7 CPU s, alternating
 * runs). glibc ignores tunables it does not know (before 2.35) and other C libraries ignore the
 * variable; a GLIBC_TUNABLES the user set is replaced.
 */
export const LAUNCHER_ENV = { GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1' } as const;

/** `NAME=value …` as the launcher's shebang and the npm scripts write LAUNCHER_ENV (not to be confused with the NODE_ENV variable). */
export const LAUNCHER_ENV_ASSIGNMENTS = Object.entries(LAUNCHER_ENV).map(([k, v]) => `${k}=${v}`);
