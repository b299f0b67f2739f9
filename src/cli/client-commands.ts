import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { getPriority, hostname } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import { runAgent } from '../client/agent.js';
import { lowerOwnPriority } from '../client/background.js';
import { selfCheckReport } from '../client/update.js';
import { addBrokers, listBrokers, removeBrokers, splitList } from '../client/session/brokers.js';
import { defaultHome, loadDevice } from '../client/vault/home.js';
import { powerOnline } from '../client/session/online.js';
import { listParked } from '../client/vault/parked.js';
import { openDisplayLink } from './open-display.js';
import { checkout, discardLocal, enroll, exportDisk, listDesktops, listRestorePoints, loginOnline, onlineSession, release, restoreDesktop, status, upload, type ClientEnv } from '../client/ops.js';
import { Vault } from '../client/vault/vault.js';
import { diskDir } from '../live/disks/disks.js';
import { readFilled } from '../live/fill/fill-direct.js';
import { CarryonError } from '../core/errors.js';
import { JobView } from '../net/broker-client.js';
import { parseRate, RateLimiter } from '../transfer-client/rate-limit.js';
import { formatBytes, passwordSource, printJsonOr, progressReporter, table } from './common.js';

/** `login --offline`: the password opened the vault, but `serve`/`run` would refuse at least one desktop (1 stays "the command failed"). */
export const OFFLINE_REFUSED_EXIT = 3;

interface GlobalOpts { home?: string; user?: string; passwordFile?: string; json?: boolean; quiet?: boolean; limitRate?: string }

function clientEnv(cmd: Command, signal?: AbortSignal): { env: ClientEnv; json: boolean; stop: () => void } {
  const o = cmd.optsWithGlobals<GlobalOpts>();
  const json = Boolean(o.json);
  const progress = progressReporter(json || Boolean(o.quiet));
  return {
    env: {
      home: o.home ?? defaultHome(),
      user: o.user ?? process.env.CARRYON_USER,
      password: passwordSource(o),
      log: (line) => (json ? undefined : process.stderr.write(`${line}\n`)),
      onProgress: progress.onProgress,
      signal,
      rateLimit: o.limitRate ? new RateLimiter(parseRate(o.limitRate)) : undefined,
    },
    json,
    stop: progress.stop,
  };
}

/** One transfer at a time per desktop; `pause` finds the running one through this pid file. */
function pidFile(home: string, desktop: string): string {
  return join(home, `transfer-${desktop.replace(/[^A-Za-z0-9._-]/g, '_')}.pid`);
}

/** Left by `carryon cancel` beside the pid file: the transfer it stops is being wiped, not paused. */
function cancelMarker(home: string, desktop: string): string {
  return `${pidFile(home, desktop)}.cancel`;
}

async function transferCommand(cmd: Command, desktop: string, run: (env: ClientEnv) => Promise<unknown>, human: (r: unknown) => string, stopped = 'transfer stopped; what arrived is kept — run the same command again to resume') {
  const abort = new AbortController();
  const { env, json, stop } = clientEnv(cmd, abort.signal);
  const pid = pidFile(env.home, desktop);
  writeFileSync(pid, String(process.pid));
  const onSignal = () => abort.abort();
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const res = await run(env);
    stop();
    printJsonOr(json, res, () => process.stdout.write(`${human(res)}\n`));
  } catch (err) {
    stop();
    if (abort.signal.aborted && existsSync(cancelMarker(env.home, desktop))) {
      // The cancel keeps what arrived as a parked copy where the check-out's policy says so (client/parked.ts).
      const vault = await Vault.open(env.home);
      const held = await vault.find(desktop).catch(() => null);
      const durable = held ? (await Promise.all(held.disks.map(async (d) => d.complete || (await readFilled(diskDir(vault, held.desktopId, d.name))).size > 0))).some(Boolean) : false;
      if (held && held.config.keepLocalCopy !== false && durable) throw new CarryonError('cancelled', `stopped by \`carryon cancel ${desktop}\`: the desktop is unlocked; what arrived stays on this laptop as an encrypted parked copy, so \`carryon checkout ${desktop}\` fetches only the rest (\`carryon discard ${desktop} --yes\` removes it)`);
      throw new CarryonError('cancelled', `stopped by \`carryon cancel ${desktop}\`: what arrived is being removed from this laptop and the desktop unlocked; \`carryon checkout ${desktop}\` starts again from the beginning`);
    }
    if (abort.signal.aborted) throw new CarryonError('paused', stopped);
    throw err;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    rmSync(pid, { force: true });
    rmSync(cancelMarker(env.home, desktop), { force: true });
  }
}

export function registerClientCommands(program: Command): void {
  program
    .option('--home <dir>', 'client data directory (env CARRYON_HOME, default ~/.carryon)')
    .option('--user <name>', 'user name (env CARRYON_USER)')
    .option('--password-file <file>', 'read the password from a file, - for standard input (else CARRYON_PASSWORD or a prompt)')
    .option('--json', 'machine-readable output')
    .option('--quiet', 'no progress output')
    .option('--limit-rate <rate>', 'cap transfer speed in bytes per second, e.g. 500K, 10M');

  const collect = (v: string, prev: string[]) => [...prev, v];
  program.command('enroll <broker-url...>').description('enrol this laptop with a broker, or with the brokers of one deployment in the order tried (pins each certificate and the signing key)')
    .option('--fingerprint <sha256>', 'expected broker certificate fingerprint (as printed by `carryon server`); once per URL in the same order, or comma-separated', collect, [])
    .option('--yes', 'trust the certificates presented now (trust on first use)')
    .option('--name <name>', 'device name', hostname())
    .option('--secret-storage <where>', 'device secret: auto (TPM when present), tpm, or file', 'auto')
    .action(async (urls: string[], o: { fingerprint: string[]; yes?: boolean; name: string; secretStorage: string }, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      if (!['auto', 'tpm', 'file'].includes(o.secretStorage)) throw new CarryonError('invalid', `--secret-storage must be auto, tpm or file, not ${o.secretStorage}`);
      const res = await enroll(env, urls, { fingerprint: o.fingerprint, acceptFingerprint: o.yes, name: o.name, secretStorage: o.secretStorage as 'auto' | 'tpm' | 'file' });
      printJsonOr(json, res, () => process.stdout.write(`device ${res.deviceId} enrolled (${res.host.cpus} CPUs, ${formatBytes(res.host.ramBytes)} RAM, ${formatBytes(res.host.freeDiskBytes)} free; device secret ${res.secretStorage === 'tpm' ? 'sealed by the TPM' : 'in a 0600 file'})\n`));
    });

  const brokers = program.command('brokers').description('the brokers this laptop uses, in the order tried (one deployment behind several URLs)');
  const showBrokers = (json: boolean, list: { url: string; fingerprint: string }[]) => printJsonOr(json, list, () => table(list.map((b, i) => ({ order: String(i + 1), url: b.url, fingerprint: b.fingerprint }))));
  brokers.command('list').description('the broker list with each pinned certificate').action(async (_o: unknown, cmd: Command) => {
    const { env, json } = clientEnv(cmd);
    showBrokers(json, await listBrokers(env.home));
  });
  brokers.command('add <broker-url...>').description('add brokers of the same deployment (checked against the signing key pinned at enrolment)')
    .option('--fingerprint <sha256>', 'expected certificate fingerprint, once per URL or comma-separated', collect, [])
    .option('--yes', 'trust the certificates presented now (trust on first use)')
    .action(async (urls: string[], o: { fingerprint: string[]; yes?: boolean }, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      showBrokers(json, await addBrokers(env, splitList(urls), { fingerprint: splitList(o.fingerprint), acceptFingerprint: o.yes }));
    });
  brokers.command('remove <broker-url...>').description('remove brokers from the list').action(async (urls: string[], _o: unknown, cmd: Command) => {
    const { env, json } = clientEnv(cmd);
    showBrokers(json, await removeBrokers(env.home, splitList(urls)));
  });

  program.command('login').description(`check credentials: online (renews the offline lease) or --offline (the vault opens and each desktop would start offline; exit ${OFFLINE_REFUSED_EXIT} when one would be refused)`)
    .option('--offline', 'do not contact the broker')
    .action(async (o: { offline?: boolean }, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      if (o.offline) {
        // A wrong password (or a vault of another device) throws here: exit 1, as for any failed command.
        const st = await status(env);
        const refused = st.filter((s) => s.refused);
        printJsonOr(json, st, () => {
          for (const s of st) process.stdout.write(s.refused ? `${s.desktop}: refused [${s.refused}]: ${s.problem}\n` : `${s.desktop}: ok offline (lease ${s.leaseHoursLeft.toFixed(1)} h left)${s.problem ? `; ${s.problem}` : ''}\n`);
          if (st.length === 0) process.stdout.write('offline login ok: no desktops held\n');
          else if (!refused.length) process.stdout.write('Check-in, rollback and replicate will ask for an online login.\n');
        });
        if (refused.length) {
          process.stderr.write(`carryon: ${refused.length} of ${st.length} desktops would not start offline (${refused.map((s) => s.desktop).join(', ')})\n`);
          process.exitCode = OFFLINE_REFUSED_EXIT;
        }
        return;
      }
      const { user, renewed } = await loginOnline(env);
      printJsonOr(json, { user, online: true, renewed }, () => process.stdout.write(`logged in as ${user}; offline lease renewed${renewed.length ? ` for ${renewed.join(', ')}` : ''}\n`));
    });

  program.command('list').description('desktops you may use, with the actions allowed now').action(async (_o: unknown, cmd: Command) => {
    const { env, json } = clientEnv(cmd);
    const desktops = await listDesktops(env);
    printJsonOr(json, desktops, () => table(desktops.map((d) => ({ name: d.name, state: d.state, actions: d.actions.join(', ') || '-' }))));
  });

  program.command('checkout <desktop>').description('check a desktop out to this laptop (resumes an interrupted one)').action(async (desktop: string, _o: unknown, cmd: Command) => {
    await transferCommand(cmd, desktop, (env) => checkout(env, desktop), (r) => {
      const x = r as { chunksMoved: number; bytesMoved: number; reusedChunks?: number; copiedChunks?: number };
      return `checked out: ${x.chunksMoved} chunks, ${formatBytes(x.bytesMoved)} transferred${x.reusedChunks ? `; ${x.reusedChunks} chunks were already here (parked copy)` : ''}${x.copiedChunks ? `; ${x.copiedChunks} copied from this laptop's other copies` : ''}`;
    });
  });
  const uploadHelp = { checkin: 'send changed blocks back and unlock', replicate: 'send changed blocks as a restore point, stay checked out', handback: 'after the check-out ended without your work (e.g. an admin force-unlocked it): send it as a restore point an admin can make current, then remove the local copy' };
  for (const kind of ['checkin', 'replicate', 'handback'] as const) {
    const c = program.command(`${kind} <desktop>`).description(uploadHelp[kind]);
    if (kind === 'replicate') {
      c.option('--background', 'low priority (nice 15 and SCHED_IDLE: CPU the desktop leaves over; a running desktop\'s fold yields to its I/O), as the agent\'s scheduled replicas run');
    }
    if (kind === 'checkin') {
      c.option('--shutdown-timeout <seconds>', 'a running desktop: how long to wait for the guest to shut down after the bulk is sent', '120')
        .option('--force', 'a running desktop: cut the guest\'s power if it does not shut down in time (writes it has not flushed are lost)');
    }
    c.action(async (desktop: string, o: { shutdownTimeout?: string; force?: boolean; background?: boolean }, cmd: Command) => {
      const secs = Number(o.shutdownTimeout ?? 120);
      if (!Number.isFinite(secs) || secs < 0 || secs > 3600) throw new CarryonError('invalid', `--shutdown-timeout must be seconds between 0 and 3600, not ${o.shutdownTimeout}`);
      const lowered = o.background ? lowerOwnPriority() : null;
      await transferCommand(cmd, desktop, (env) => {
        if (lowered) env.log(`replicating ${desktop} in the background: CPU priority nice ${getPriority()}${lowered.idle ? ', idle class (SCHED_IDLE)' : ''}; a running desktop folds it at its own pace`);
        return upload(env, desktop, kind, { shutdownGraceMs: secs * 1000, force: o.force === true, background: o.background === true });
      }, (r) => {
        const x = r as { changedChunks: number; chunksSent: number; bytesSent: number; snapshotId: string };
        return `${kind}: ${x.changedChunks} changed chunks, ${x.chunksSent} sent (${formatBytes(x.bytesSent)}); snapshot ${x.snapshotId}`;
      }, o.background ? `the background replica of ${desktop} was stopped (it gives way to the user's commands, a lock or a wipe): nothing is lost, the next replica sends these changes` : undefined);
    });
  }
  for (const how of ['rollback', 'cancel'] as const) {
    program.command(`${how} <desktop>`).description(how === 'rollback' ? 'discard offline changes and unlock' : 'stop a check-out in flight and unlock').action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      const file = pidFile(env.home, desktop);
      if (how === 'cancel' && existsSync(file)) {
        writeFileSync(cancelMarker(env.home, desktop), String(process.pid));
        try { process.kill(Number(readFileSync(file, 'utf8')), 'SIGTERM'); } catch { /* already gone */ }
      }
      const res = await release(env, desktop, how).finally(() => rmSync(cancelMarker(env.home, desktop), { force: true }));
      printJsonOr(json, res, () => process.stdout.write(`${desktop}: ${res.state}\n`));
    });
  }
  for (const op of ['pause', 'resume'] as const) {
    program.command(`${op} <desktop>`).description(op === 'pause' ? 'pause a running transfer (keeps its slot for the grace time)' : 'resume a paused transfer').action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      const vault = await Vault.open(env.home);
      const state = await vault.find(desktop);
      if (!state.jobId) throw new CarryonError('wrong-state', `${desktop} has no transfer in progress`);
      const { broker } = await onlineSession(env);
      try {
        const job = await broker.call('POST', `/v1/jobs/${state.jobId}/${op}`, {}, JobView);
        const file = pidFile(env.home, desktop);
        if (op === 'pause' && existsSync(file)) {
          try { process.kill(Number(readFileSync(file, 'utf8')), 'SIGINT'); } catch { /* not running */ }
        }
        printJsonOr(json, job, () => process.stdout.write(op === 'pause' ? `paused; run \`carryon resume ${desktop}\` to continue\n` : `resumed slot; run \`carryon checkout ${desktop}\` to continue pulling\n`));
      } finally {
        await broker.close();
      }
    });
  }

  program.command('status [desktop]').description('state, lease left, dirty bytes, replication, and whether it is safe to go offline (works offline)').action(async (desktop: string | undefined, _o: unknown, cmd: Command) => {
    const { env, json } = clientEnv(cmd);
    // Parked copies (kept after a check-in, rollback or cancel; client/parked.ts) are listed with their size, never opened.
    const parked = (await listParked(env.home)).filter((p) => !desktop || p.name === desktop || p.desktopId === desktop);
    // A parked copy beside the vault it came from (a check-in cut off while parking): both are shown.
    const st = desktop && parked.length && !(await Vault.open(env.home).then((v) => v.list())).some((s) => s.name === desktop || s.desktopId === desktop) ? [] : await status(env, desktop);
    // JSON lists the same as the text: checked-out desktops, then parked copies (state 'parked').
    const parkedJson = parked.map((p) => ({ desktop: p.name, desktopId: p.desktopId, state: 'parked', parkedAt: p.parkedAt, bytes: p.bytes }));
    printJsonOr(json, [...st, ...parkedJson], () => {
      for (const p of parked) process.stdout.write(`${p.name}: parked copy, ${formatBytes(p.bytes)} on this laptop since ${p.parkedAt ?? '?'} (encrypted; not runnable; \`carryon checkout ${p.name}\` starts from it, \`carryon discard ${p.name} --yes\` removes it)\n`);
      if (desktop && parked.length && st.length === 0) return;
      table(st.map((s) => ({ desktop: s.desktop, state: s.state, lease: s.leaseDeadline ? `${s.leaseHoursLeft.toFixed(1)} h` : '-', changed: s.dirtyBytes === null ? (s.refused ? `- (${s.refused})` : '-') : formatBytes(s.dirtyBytes), local: `${s.percentLocal.toFixed(1)}%${s.chunksCopiedLocally ? ` (${s.chunksCopiedLocally} chunks copied here, ${s.chunksFetched ?? 0} fetched)` : ''}`, replicated: s.lastReplicationAt ? `${s.lastReplicationAt}${s.lastReplicaKind ? ` (${s.lastReplicaKind})` : ''}` : 'never', offline: s.safeOffline ? 'safe to go offline' : s.refused ? `NOT usable offline (${s.refused})` : 'NOT yet safe to go offline' })));
      for (const s of st) {
        if (s.problem) process.stdout.write(`${s.desktop}: ${s.problem}\n`);
        if (s.readFailures) process.stdout.write(`${s.desktop}: ${s.readFailures} read failures, last: ${s.lastReadFailure}\n`);
      }
      if (st[0]?.advisory) process.stdout.write(`note: ${st[0].advisory}\n`);
    });
  });

  program.command('discard <desktop>').description('remove the local copy of a desktop the broker no longer holds for you (after exporting what you need)')
    .option('--yes', 'really remove it: offline changes not checked in are lost')
    .action(async (desktop: string, o: { yes?: boolean }, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      if (!o.yes) throw new CarryonError('confirm', `this deletes ${desktop} and any offline changes on this laptop; save them first with \`carryon export ${desktop} <file>\`, then run again with --yes`);
      const res = await discardLocal(env, desktop);
      printJsonOr(json, res, () => process.stdout.write(`${desktop}: local copy removed\n`));
    });

  program.command('restore <desktop> [restore-point]').description('make a restore point your desktop\'s current version (where policy restoreAllowed lets you); without one: list them')
    .option('--reason <text>', 'goes to the audit trail')
    .action(async (desktop: string, point: string | undefined, o: { reason?: string }, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      if (!point) {
        const r = await listRestorePoints(env, desktop);
        printJsonOr(json, r, () => {
          table(r.restorePoints.map((p) => ({ id: p.id, kind: p.kind, created: p.createdAt, size: formatBytes(p.sizeBytes), current: p.current ? 'yes' : '' })));
          process.stdout.write(r.canRestore ? `restore one with \`carryon restore ${r.desktop} <id>\`\n` : `cannot restore now: ${r.reason ?? 'refused'}\n`);
        });
        return;
      }
      const r = await restoreDesktop(env, desktop, point, o.reason);
      printJsonOr(json, r, () => process.stdout.write(`${r.desktop} restored from ${r.restoredFrom}; \`carryon checkout ${r.desktop}\` starts from it\n`));
    });

  for (const [verb, what] of [['start', 'run the desktop online on a datacenter host (where policy onlineAllowed lets you; not while it is checked out)'], ['stop', 'shut the desktop down on its datacenter host (ACPI, then powered off)']] as const) {
    program.command(`${verb} <desktop>`).description(what).action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      const r = await powerOnline(env, desktop, verb);
      printJsonOr(json, r, () => process.stdout.write(`${r.desktop}: ${r.state} on host ${r.host}\n`));
    });
  }

  program.command('open <desktop>').description("print a one-time link to the desktop's screen in a browser (it must run on a datacenter host; valid for one connection, 30 s)")
    .action(async (desktop: string, _o: unknown, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      const r = await openDisplayLink(env, desktop);
      printJsonOr(json, r, () => process.stdout.write(`${r.url}\n(open it within 30 s, until ${r.expiresAt}; it works once)\n`));
    });

  program.command('export <desktop> <file>').description('write the desktop disk to a file (raw or qcow2)').option('--format <fmt>', 'raw or qcow2', 'raw').action(async (desktop: string, file: string, o: { format: string }, cmd: Command) => {
    if (o.format !== 'raw' && o.format !== 'qcow2') throw new CarryonError('invalid', `--format must be raw or qcow2, not ${o.format}`);
    const { env, json } = clientEnv(cmd);
    const res = await exportDisk(env, desktop, file, o.format);
    printJsonOr(json, res, () => process.stdout.write(`wrote ${file} (${o.format}, ${formatBytes(res.bytes)})\n`));
  });

  program.command('agent').description('heartbeats, policy, remote commands, replication, lease lock (outbound only; never listens)').option('--once', 'one heartbeat round, then exit')
    .action(async (o: { once?: boolean }, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      await loadDevice(env.home);
      const abort = new AbortController();
      process.once('SIGINT', () => abort.abort());
      process.once('SIGTERM', () => abort.abort());
      const res = await runAgent(env, { once: Boolean(o.once), signal: abort.signal });
      if (o.once) printJsonOr(json, res, () => process.stdout.write(`heartbeat sent; ${res.commands} commands run; next in ${res.intervalSec} s${res.update ? `; update: ${res.update}` : ''}\n`));
      else if (res.update === 'done') process.stderr.write('carryon: updated; exiting so the service starts the new version\n');
    });

  program.command('self-check').description('check this installation: it loads, states its version and opens the home read-only (run by the agent after an update)')
    .action(async (_o: unknown, cmd: Command) => {
      const { env, json } = clientEnv(cmd);
      const r = await selfCheckReport(env.home);
      printJsonOr(json, r, () => process.stdout.write(`carryon ${r.version}: ok (${r.enrolled ? `enrolled, ${r.desktops} desktop(s)` : 'not enrolled'})\n`));
    });
}
