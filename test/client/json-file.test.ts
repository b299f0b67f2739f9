import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { z } from 'zod';
import { pendingEvents, recordEvent } from '../../src/live/disks/events.js';
import { readJsonFile } from '../../src/files/json-file.js';

const Schema = z.object({ n: z.number() });

test('readJsonFile: missing gives the fallback; damaged refuses unless the caller names a fallback for it', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'carryon-json-'));
  try {
    const path = join(dir, 'x.json');
    assert.equal(await readJsonFile(path, Schema, { missing: null }), null);
    writeFileSync(path, JSON.stringify({ n: 3 }));
    assert.deepEqual(await readJsonFile(path, Schema, { missing: null }), { n: 3 });
    for (const text of ['{"n":', '{"n":"three"}', '']) {
      writeFileSync(path, text);
      await assert.rejects(readJsonFile(path, Schema, { missing: null }), { code: 'bad-state', message: /x\.json is damaged/ });
      assert.equal(await readJsonFile(path, Schema, { missing: null, damaged: 'fallback' }), 'fallback');
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('offline events: a damaged events.json is set aside, not overwritten', async () => {
  const home = mkdtempSync(join(tmpdir(), 'carryon-events-'));
  try {
    writeFileSync(join(home, 'events.json'), '[{"time":"2020-01-01T00:00:00Z","action":"export"');
    await recordEvent(home, 'run', 'd1');
    const aside = readdirSync(home).filter((f) => f.startsWith('events.json.damaged-'));
    assert.equal(aside.length, 1);
    assert.match(readFileSync(join(home, aside[0]!), 'utf8'), /"action":"export"/);
    const { events } = await pendingEvents(home);
    assert.deepEqual(events.map((e) => e.action), ['run']);
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
});
