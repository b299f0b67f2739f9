/** Base class: every error Carryon raises on purpose has a stable machine-readable code. */
export class CarryonError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/** Input that does not meet a documented constraint (sizes, formats, arguments). */
export class ValidationError extends CarryonError {
  constructor(message: string) {
    super('invalid', message);
  }
}

export type BlobFailure = 'truncated' | 'version' | 'flags' | 'auth' | 'decompress' | 'id-mismatch' | 'too-large' | 'delta';

/** A chunk blob that must not be trusted. Never carries data. */
export class BlobError extends CarryonError {
  constructor(
    readonly chunkId: string,
    readonly reason: BlobFailure,
    detail?: string,
  ) {
    super('bad-blob', `chunk ${chunkId}: blob rejected (${reason})${detail ? `: ${detail}` : ''}`);
  }
}

/** A manifest that does not decode or does not fit its declared shape. */
export class ManifestError extends CarryonError {
  constructor(message: string) {
    super('bad-manifest', message);
  }
}

/** A crypto envelope (wrapped key, lease, vault record) that does not open. */
export class EnvelopeError extends CarryonError {
  constructor(message: string) {
    super('bad-envelope', message);
  }
}
