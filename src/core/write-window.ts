/**
 * A bounded window of asynchronous writes in flight: `add` waits while the window is full, and
 * the first failure is thrown by the next `add` or `drain` (never left as an unhandled rejection).
 */
export class WriteWindow {
  private readonly inFlight = new Set<Promise<void>>();
  private failure: { error: unknown } | null = null;

  constructor(private readonly size: number) {}

  async add(write: Promise<void>): Promise<void> {
    // Tracked before anything can throw: a write handed over is always observed.
    const tracked: Promise<void> = write.then(
      () => void this.inFlight.delete(tracked),
      (error: unknown) => {
        this.inFlight.delete(tracked);
        this.failure ??= { error };
      },
    );
    this.inFlight.add(tracked);
    while (this.inFlight.size >= this.size) await Promise.race(this.inFlight);
    this.check();
  }

  async drain(): Promise<void> {
    await Promise.all(this.inFlight);
    this.check();
  }

  private check(): void {
    if (this.failure) throw this.failure.error;
  }
}
