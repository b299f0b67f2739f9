/**
 * The few pieces of the WebAssembly binary format that Carryon's hand-assembled modules need
 * (qcow2/xts-tweaks-wasm.ts, af-sha256-wasm.ts): no toolchain, nothing downloaded.
 */

/** Unsigned LEB128 (sizes, indices, memarg offsets). */
export function uleb(n: number): number[] {
  const out: number[] = [];
  do {
    let b = n & 0x7f;
    n >>>= 7;
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return out;
}

/** Signed LEB128 of a 32-bit value (i32.const takes it signed). */
export function sleb(n: number): number[] {
  const out: number[] = [];
  let v = n | 0;
  for (;;) {
    const b = v & 0x7f;
    v >>= 7;
    if ((v === 0 && (b & 0x40) === 0) || (v === -1 && (b & 0x40) !== 0)) return [...out, b];
    out.push(b | 0x80);
  }
}

/** A name: its length, then its UTF-8 bytes. */
export function name(s: string): number[] {
  return [...uleb(s.length), ...Buffer.from(s, 'utf8')];
}

/** A section: its id, its length, its body. */
export function section(id: number, body: number[]): number[] {
  return [id, ...uleb(body.length), ...body];
}
