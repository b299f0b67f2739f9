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
