import { spawnSync } from 'node:child_process';
import { readlinkSync } from 'node:fs';
import { setPriority } from 'node:os';

/**
 * Puts the calling thread (not its process) at nice 19 and, where util-linux `chrt` is, in
 * SCHED_IDLE: a worker thread of the transfer server that rebuilds background replicas then runs
 * only on CPU that users' transfers (and, on a shared box, a guest) leave. Linux only: elsewhere
 * nothing changes. Says what it managed.
 */
export function idleThisThread(): { nice: boolean; idle: boolean } {
  if (process.platform !== 'linux') return { nice: false, idle: false };
  let tid: number;
  try {
    // "<pid>/task/<tid>": Node has no gettid().
    tid = Number(readlinkSync('/proc/thread-self').split('/').pop());
  } catch {
    return { nice: false, idle: false };
  }
  if (!Number.isInteger(tid) || tid <= 0) return { nice: false, idle: false };
  let nice = true;
  try {
    setPriority(tid, 19);
  } catch {
    nice = false;
  }
  const r = spawnSync('chrt', ['--idle', '--pid', '0', String(tid)], { stdio: 'ignore', timeout: 5000 });
  return { nice, idle: r.status === 0 };
}
