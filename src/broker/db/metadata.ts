/** The broker's metadata store: the interface and row types (implementations in ./metadata/). */
export * from './types.js';
