/**
 * The laptop's operations, one module each; this is the surface the CLI, the demo, the agent,
 * the benches and the tests import from.
 */
export { enroll } from './brokers.js';
export { checkout } from './checkout.js';
export { upload } from './checkin.js';
export { exportDisk } from './export-disk.js';
export { NO_TPM_ADVISORY, status } from './status.js';
export { discardLocal, release } from './release.js';
export { listRestorePoints, restoreDesktop } from './restore.js';
export { listDesktops, loginOnline, onlineSession, type ClientEnv } from './session.js';
