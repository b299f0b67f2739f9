/** A FIFO lock for one process: `held` says whether someone has it, `acquire` waits its turn. */
export class Mutex {
  private queue: (() => void)[] = [];
  held = false;

  async acquire(): Promise<() => void> {
    if (this.held) await new Promise<void>((r) => this.queue.push(r));
    this.held = true;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.queue.shift();
      if (next) next();
      else this.held = false;
    };
  }
}
