import { readFileSync } from 'node:fs';

/**
 * The version of this installation, read from its own package.json (dist/src/core → the package
 * root), so a bundle packed at another version reports that version: client updates compare it.
 */
export const PACKAGE_VERSION: string = (JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string }).version;
