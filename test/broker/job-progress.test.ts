import assert from 'node:assert/strict';
import { test } from 'node:test';
import { JobProgress, jobPercent, RATE_WINDOW_MS } from '../../src/broker/transfers/progress.js';

const counters = (bytesOut: number) => ({ bytesIn: 0, bytesOut, chunksIn: 0, chunksOut: 0 });

test('job rate: a sliding window over reports, not the last two (a server writes in bursts)', () => {
  let now = 0;
  const p = new JobProgress(() => now);
  // 1 MB every other second: between two reports the counter is often unchanged.
  for (let s = 0; s <= 6; s++) {
    now = s * 1000;
    p.report('t', [['job', counters(Math.ceil(s / 2) * 1_000_000)]]);
  }
  const rate = p.get('job')!.rate;
  assert.ok(rate >= 300_000 && rate <= 700_000, `about 0.5 MB/s over the window, got ${rate}`);
  // No report for long: not moving.
  now += 20_000;
  assert.equal(p.get('job')!.rate, 0);
});

test("job rate: a check-out's is counted where the bytes arrive (the laptop's reports)", () => {
  let now = 0;
  const p = new JobProgress(() => now);
  // The server wrote everything into socket buffers at once; the laptop takes it in at 1 MB/s.
  p.report('t', [['job', counters(8_000_000)]]);
  for (let s = 0; s <= RATE_WINDOW_MS / 1000 + 2; s++) {
    now = s * 1000;
    p.report('t', [['job', counters(8_000_000)]]);
    p.reportLocal('job', { bytesLocal: s * 1_000_000, bytesTotal: 8_000_000, bytesReceived: s * 1_000_000 });
  }
  assert.equal(Math.round(p.get('job')!.rate), 1_000_000);
  assert.equal(jobPercent(p.get('job')!.local), 87.5);
  // A resumed job (a new process, its counter from 0): the window starts again, no negative rate.
  now += 1000;
  p.reportLocal('job', { bytesLocal: 7_000_000, bytesTotal: 8_000_000, bytesReceived: 0 });
  assert.equal(p.get('job')!.rate, 0);
});

test('job percent: data bytes local over data bytes, one decimal; unknown until the laptop reports', () => {
  assert.equal(jobPercent(null), null);
  assert.equal(jobPercent({ bytesLocal: 0, bytesTotal: 0 }), 100);
  assert.equal(jobPercent({ bytesLocal: 195, bytesTotal: 1000 }), 19.5);
  const p = new JobProgress(() => 0);
  p.reportLocal('job', { bytesLocal: 2000, bytesTotal: 1000 });
  assert.equal(jobPercent(p.get('job')!.local), 100);
});
