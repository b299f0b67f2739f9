import { ValidationError } from '../core/errors.js';
import type { Backend } from './backend/backend.js';

const DIGEST_RE = /^[0-9a-f]{64}$/;

/** Manifests by content digest (hex SHA-256 of their encoding), as whole objects in a backend. */
export class Manifests {
  constructor(private readonly backend: Pick<Backend, 'read' | 'write' | 'list' | 'delete'>) {}

  private name(digest: string): string {
    if (!DIGEST_RE.test(digest)) throw new ValidationError(`not a manifest digest: ${digest.slice(0, 80)}`);
    return digest;
  }

  async put(digest: string, encoded: Uint8Array): Promise<void> {
    return this.backend.write('manifests', this.name(digest), encoded);
  }

  async get(digest: string): Promise<Buffer | null> {
    return this.backend.read('manifests', this.name(digest));
  }

  /** Every stored manifest with its last modification (ms). */
  async *list(): AsyncIterable<{ digest: string; modifiedAt: number }> {
    for await (const o of this.backend.list('manifests')) if (DIGEST_RE.test(o.name)) yield { digest: o.name, modifiedAt: o.modifiedAt };
  }

  async delete(digest: string): Promise<void> {
    return this.backend.delete('manifests', this.name(digest));
  }
}
