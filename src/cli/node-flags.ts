/**
 * V8 flags every Carryon process runs with (the `carryon` launcher's shebang passes the same).
 * A 64 MiB young generation: a transfer keeps tens of MiB of chunk buffers in flight, and with
 * V8's default (16 MiB) they outlive young collections and churn full GCs — measured on a 4 GiB
 * check-out: 13 s of CPU in the laptop process instead of 6, 16.7 s instead of 11–13 s of wall
 * time. The flag cannot be set after start (v8.setFlagsFromString does not resize the heap).
 */
export const NODE_FLAGS = ['--max-semi-space-size=64'] as const;
