export * from './errors.js';
export * from './chunking.js';
export * from './chunk-id.js';
export * from './envelope.js';
export * from './keys.js';
export * from './blob.js';
export * from './manifest.js';
