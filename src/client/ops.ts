/**
 * The laptop's operations, one module each; this is the surface the CLI, the demo, the agent,
 * the benches and the tests import from.
 */
export { enroll } from './session/brokers.js';
export { checkout } from './ops/checkout.js';
export { upload } from './ops/checkin.js';
export { exportDisk } from './ops/export-disk.js';
export { NO_TPM_ADVISORY, status } from './ops/status.js';
export { discardLocal, release } from './ops/release.js';
export { listRestorePoints, restoreDesktop } from './ops/restore.js';
export { listDesktops, loginOnline, onlineSession, type ClientEnv } from './session/session.js';
