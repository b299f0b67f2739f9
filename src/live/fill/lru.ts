/** Byte-bounded LRU of buffers (Map keeps insertion order; a hit re-inserts at the end). */
export class ByteLru<K> {
  private readonly map = new Map<K, Buffer>();
  private bytes = 0;

  constructor(private readonly maxBytes: number) {}

  get(key: K): Buffer | undefined {
    const v = this.map.get(key);
    if (v === undefined) return undefined;
    this.map.delete(key);
    this.map.set(key, v);
    return v;
  }

  /** Presence without touching recency. */
  has(key: K): boolean {
    return this.map.has(key);
  }

  set(key: K, value: Buffer): void {
    this.delete(key);
    if (value.length > this.maxBytes) return;
    this.map.set(key, value);
    this.bytes += value.length;
    for (const [k, v] of this.map) {
      if (this.bytes <= this.maxBytes) break;
      this.map.delete(k);
      this.bytes -= v.length;
    }
  }

  delete(key: K): void {
    const v = this.map.get(key);
    if (v === undefined) return;
    this.map.delete(key);
    this.bytes -= v.length;
  }

  clear(): void {
    this.map.clear();
    this.bytes = 0;
  }

  get size(): number {
    return this.bytes;
  }
}
