/** The broker states the version of the installation it runs (core/version.ts reads it). */
export { PACKAGE_VERSION } from '../core/version.js';
