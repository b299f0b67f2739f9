import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, normalize, relative } from 'node:path';
import { test } from 'node:test';

/**
 * The house in rooms (docs/architecture.md, decision 57): the import graph of src/ read from the
 * sources themselves (nothing is run or compiled), checked against the floors below. A room is a
 * top-level folder of src/; an import may only go down to a lower floor. Rooms on one floor never
 * import each other, so the desktop host (host/) cannot lean on the laptop (client/) nor the other
 * way round, and the live chain (live/) knows nothing of the vault, the CLI or the broker.
 */
const FLOORS: Record<string, number> = {
  core: 0,
  files: 1, net: 1, qemu: 1, sql: 1,
  disk: 2, store: 2, hypervisor: 2,
  nbd: 3, import: 3, 'transfer-client': 3, transfer: 3, devices: 3,
  live: 4,
  client: 5, host: 5, broker: 5,
  cli: 6,
  demo: 7,
};

/** The two sides of the wire: neither imports the other's rooms (they meet in core/, net/, store/). */
const BROKER_SIDE = ['broker', 'transfer'];
const MACHINE_SIDE = ['transfer-client', 'live', 'client', 'host', 'devices'];

/** Floors inside a room, lowest first: a sub-room imports only the ones before it ('' is the room's own top). */
const SUB_FLOORS: Record<string, string[]> = {
  client: ['client/vault', 'client/session', 'client/ops', 'client/devices', 'client'],
  live: ['live/disks', 'live/fill', 'live'],
};

/** Named here as well as implied by the floors: the rules the next issues lean on. */
const NEVER: { from: string; to: string[]; why: string }[] = [
  { from: 'live', to: ['client', 'cli', 'broker'], why: 'the live chain takes secrets and paths; a desktop host uses it without the vault' },
  { from: 'host', to: ['client'], why: 'the desktop host holds chains as a laptop does, without its vault' },
];

/** The most .ts files one folder of src/ may hold (issue 23: "none over ≈ 12 files"). */
const MAX_FILES = 12;

const SRC = join(process.cwd(), 'src');

function sources(dir: string): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...sources(p));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

/**
 * The relative specifiers a file imports: static imports and re-exports (type-only ones too: a
 * type is an arrow as much as a value), side-effect imports and dynamic `import()`. Statements
 * start a line; lines of comments (` * …`, `// …`) are skipped.
 */
export function specifiers(text: string): string[] {
  const code = text.split('\n').filter((l) => !/^\s*(\*|\/\/|\/\*)/.test(l)).join('\n');
  const found: string[] = [];
  for (const re of [
    /^\s*(?:import|export)\b[^;'"`]*?\bfrom\s*['"]([^'"]+)['"]/gm,
    /^\s*import\s*['"]([^'"]+)['"]/gm,
    /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g,
  ]) {
    for (const m of code.matchAll(re)) found.push(m[1]!);
  }
  return found.filter((s) => s.startsWith('.'));
}

/** src-relative path → the src-relative paths it imports. */
function importGraph(): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const file of sources(SRC)) {
    const from = relative(SRC, file);
    const to = specifiers(readFileSync(file, 'utf8')).map((s) => normalize(join(dirname(from), s)).replace(/\.js$/, '.ts'));
    graph.set(from, [...new Set(to)]);
  }
  return graph;
}

const graph = importGraph();
const roomOf = (file: string) => file.split('/')[0]!;
const folderOf = (file: string) => dirname(file) === '.' ? '' : dirname(file);

/** One cycle through each strongly connected set of files (Tarjan), as a path that ends where it began. */
export function cycles(g: Map<string, string[]>): string[][] {
  let next = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const found: string[][] = [];
  const visit = (v: string) => {
    index.set(v, next);
    low.set(v, next++);
    stack.push(v);
    onStack.add(v);
    for (const w of g.get(v) ?? []) {
      if (!g.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) low.set(v, Math.min(low.get(v)!, index.get(w)!));
    }
    if (low.get(v) !== index.get(v)) return;
    const members = new Set<string>();
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      members.add(w);
    } while (w !== v);
    if (members.size > 1 || (g.get(v) ?? []).includes(v)) found.push(pathWithin(g, members, v));
  };
  for (const v of g.keys()) if (!index.has(v)) visit(v);
  return found;
}

/** A shortest path from `start` back to itself inside `members` (breadth first). */
function pathWithin(g: Map<string, string[]>, members: Set<string>, start: string): string[] {
  const prev = new Map<string, string>();
  const queue = [start];
  while (queue.length) {
    const v = queue.shift()!;
    for (const w of g.get(v) ?? []) {
      if (!members.has(w)) continue;
      if (w === start) {
        const path = [start];
        for (let x = v; x !== start; x = prev.get(x)!) path.unshift(x);
        path.unshift(start);
        return path;
      }
      if (!prev.has(w)) {
        prev.set(w, v);
        queue.push(w);
      }
    }
  }
  return [start];
}

test('every relative import in src/ names a file that exists', () => {
  const missing = [...graph].flatMap(([from, to]) => to.filter((t) => !graph.has(t) && !t.endsWith('.d.ts')).map((t) => `${from} -> ${t}`));
  assert.deepEqual(missing, []);
});

test('src/ has no import cycle', () => {
  const found = cycles(graph).map((c) => c.join(' -> '));
  assert.deepEqual(found, [], `import cycles:\n${found.join('\n')}`);
});

test('every room of src/ has a floor', () => {
  const rooms = new Set([...graph.keys()].map(roomOf).filter((r) => !r.endsWith('.ts')));
  assert.deepEqual([...rooms].filter((r) => !(r in FLOORS)).sort(), []);
});

test('imports go down a floor, never up or sideways, and never across the wire', () => {
  const wrong: string[] = [];
  for (const [from, to] of graph) {
    const a = roomOf(from);
    for (const target of to) {
      const b = roomOf(target);
      if (a === b) continue;
      if (!(FLOORS[b]! < FLOORS[a]!)) wrong.push(`${from} -> ${target} (${a} on floor ${FLOORS[a]}, ${b} on floor ${FLOORS[b]})`);
      const across = (BROKER_SIDE.includes(a) && MACHINE_SIDE.includes(b)) || (MACHINE_SIDE.includes(a) && BROKER_SIDE.includes(b));
      if (across) wrong.push(`${from} -> ${target} (${a} and ${b} are on the two sides of the wire)`);
    }
  }
  assert.deepEqual(wrong, [], `arrows up a floor:\n${wrong.join('\n')}`);
});

test('inside a room, sub-rooms import only the ones below them', () => {
  const wrong: string[] = [];
  for (const [from, to] of graph) {
    const order = SUB_FLOORS[roomOf(from)];
    if (!order) continue;
    const a = order.indexOf(folderOf(from));
    assert.ok(a >= 0, `${from}: ${folderOf(from)} is not in the sub-floors of ${roomOf(from)}`);
    for (const target of to) {
      if (roomOf(target) !== roomOf(from) || folderOf(target) === folderOf(from)) continue;
      const b = order.indexOf(folderOf(target));
      if (!(b >= 0 && b < a)) wrong.push(`${from} -> ${target}`);
    }
  }
  assert.deepEqual(wrong, [], `arrows up inside a room:\n${wrong.join('\n')}`);
});

test('the live chain imports nothing of the vault, the CLI or the broker; the desktop host nothing of the laptop', () => {
  const wrong: string[] = [];
  for (const rule of NEVER) {
    for (const [from, to] of graph) {
      if (roomOf(from) !== rule.from) continue;
      for (const target of to) if (rule.to.includes(roomOf(target))) wrong.push(`${from} -> ${target}: ${rule.why}`);
    }
  }
  assert.deepEqual(wrong, []);
});

test(`no folder of src/ holds more than ${MAX_FILES} .ts files`, () => {
  const counts = new Map<string, number>();
  for (const file of graph.keys()) counts.set(folderOf(file), (counts.get(folderOf(file)) ?? 0) + 1);
  const over = [...counts].filter(([, n]) => n > MAX_FILES).map(([dir, n]) => `src/${dir}: ${n}`);
  assert.deepEqual(over, []);
});

test('the reader of imports sees type-only, multi-line, re-exported and dynamic imports, and skips comments', () => {
  const text = [
    "import type { A } from './a.js';",
    'import {',
    '  b,',
    "} from '../b.js';",
    "export * from './c.js';",
    "import './d.js';",
    "const e = await import('./e.js');",
    " * import { f } from './f.js';",
    "// import { g } from './g.js';",
    "import { z } from 'zod';",
  ].join('\n');
  assert.deepEqual(specifiers(text).sort(), ['../b.js', './a.js', './c.js', './d.js', './e.js']);
  const g = new Map([['a', ['b']], ['b', ['c']], ['c', ['a']], ['d', ['a']]]);
  assert.deepEqual(cycles(g), [['a', 'b', 'c', 'a']]);
});
