/**
 * The laptop's two clocks in one object, so tests move time in-process. Never from an
 * environment variable or a file: either would be a way back in time for whoever runs the client.
 */
export const laptopClock = {
  /** Wall-clock ms: the system clock, which root (`date -s`) or faketime can set anywhere. */
  now: (): number => Date.now(),
  /**
   * Ms since an arbitrary start (CLOCK_MONOTONIC): setting the system clock does not move it, and
   * it stands still while the laptop sleeps, so what it measures is a lower bound on time passed.
   */
  monotonic: (): number => performance.now(),
};
