export * from './errors.js';
export * from './chunks/chunking.js';
export * from './chunk-id.js';
export * from './envelope.js';
export * from './keys.js';
export * from './chunks/blob.js';
export * from './chunks/manifest.js';
