import { useState } from 'preact/hooks';
import { api, enc, get, putBytes } from '../api';
import { ago, bytes, left } from '../format';
import { useAction, usePoll } from '../hooks';
import { Badge, Empty, Field, Progress, Section, Status } from '../ui';
import { RestorePointList } from './restore-points';
import type { AdminDesktop, ImportJob, Pool } from './types';

const CHUNK = 8 * 1024 * 1024;

/** Sends a file in pieces from where the broker stopped (resumes after a broken connection). */
async function upload(file: File, onProgress: (done: number) => void): Promise<string> {
  const up = await api<{ id: string; received: number }>('POST', '/v1/admin/uploads', { name: file.name, sizeBytes: file.size });
  let received = up.received;
  for (let tries = 0; received < file.size; ) {
    try {
      const r = await putBytes<{ received: number }>(`/v1/admin/uploads/${up.id}?offset=${received}`, file.slice(received, Math.min(file.size, received + CHUNK)));
      received = r.received;
      tries = 0;
    } catch (e) {
      if (++tries > 5) throw e;
      received = (await get<{ received: number }>(`/v1/admin/uploads/${up.id}`)).received;
    }
    onProgress(received);
  }
  return up.id;
}

function ImportForm({ pools, onStarted }: { pools: Pool[]; onStarted: () => void }) {
  const [name, setName] = useState('');
  const [source, setSource] = useState<'path' | 'upload'>('path');
  const [path, setPath] = useState('');
  const [file, setFile] = useState<File | null>(null);
  const [pool, setPool] = useState('');
  const [vcpus, setVcpus] = useState('2');
  const [ram, setRam] = useState('2048');
  const [sent, setSent] = useState<number | null>(null);
  const act = useAction();
  return (
    <form
      aria-label="Import a desktop"
      onSubmit={(e) => {
        e.preventDefault();
        void act.run(async () => {
          const config = { vcpus: Number(vcpus), ramMiB: Number(ram), minRamMiB: Math.min(512, Number(ram)), nic: 'user', usb: false };
          if (source === 'path') await api('POST', '/v1/admin/desktops', { name, image: path, pool: pool || undefined, config, background: true });
          else {
            if (!file) throw new Error('choose a file');
            const id = await upload(file, setSent);
            await api('POST', `/v1/admin/uploads/${id}/import`, { name, pool: pool || undefined, config });
          }
          setSent(null);
          onStarted();
          return `importing ${name}`;
        });
      }}
    >
      <div class="inline form">
        <Field label="Desktop name">
          <input value={name} onInput={(e) => setName(e.currentTarget.value)} required pattern="[A-Za-z0-9._@\-]{1,64}" />
        </Field>
        <fieldset>
          <legend>Image</legend>
          <label><input type="radio" name="source" checked={source === 'path'} onChange={() => setSource('path')} /> Path on the broker host</label>{' '}
          <label><input type="radio" name="source" checked={source === 'upload'} onChange={() => setSource('upload')} /> Upload from this computer</label>
        </fieldset>
        {source === 'path' ? (
          <Field label="Image path" hint="Absolute path, read on the broker host (raw, qcow2, vmdk, vdi).">
            <input value={path} onInput={(e) => setPath(e.currentTarget.value)} required placeholder="/srv/images/win11.qcow2" />
          </Field>
        ) : (
          <Field label="Image file" hint="Sent to the broker in pieces; an interrupted upload resumes.">
            <input type="file" onChange={(e) => setFile(e.currentTarget.files?.[0] ?? null)} required />
          </Field>
        )}
        <Field label="Pool">
          <select value={pool} onChange={(e) => setPool(e.currentTarget.value)}>
            <option value="">(none)</option>
            {pools.map((p) => <option key={p.id} value={p.name}>{p.name}</option>)}
          </select>
        </Field>
        <Field label="vCPUs"><input type="number" min={1} max={256} value={vcpus} onInput={(e) => setVcpus(e.currentTarget.value)} /></Field>
        <Field label="RAM (MiB)"><input type="number" min={64} value={ram} onInput={(e) => setRam(e.currentTarget.value)} /></Field>
        <button type="submit" disabled={act.busy}>Import</button>
      </div>
      {sent !== null && file && <Progress percent={(sent / file.size) * 100} label={`Upload of ${file.name}`} />}
      <Status error={act.error} note={act.note} />
    </form>
  );
}

function Imports() {
  const imports = usePoll(() => get<{ imports: ImportJob[] }>('/v1/admin/imports'), 700);
  const list = [...(imports.data?.imports ?? [])].reverse().slice(0, 8);
  if (list.length === 0) return null;
  return (
    <table aria-label="Imports">
      <thead><tr><th>Import</th><th>State</th><th>Progress</th><th class="num">Size</th><th>Started</th></tr></thead>
      <tbody>
        {list.map((j) => (
          <tr key={j.id} data-import={j.name}>
            <td>{j.name}</td>
            <td>{j.state === 'failed' ? <Badge kind="bad">failed: {j.error?.message}</Badge> : <Badge kind={j.state === 'done' ? 'ok' : 'warn'}>{j.state}</Badge>}</td>
            <td><Progress percent={j.bytesTotal ? (j.bytesDone / j.bytesTotal) * 100 : 0} label={`Import of ${j.name}`} /></td>
            <td class="num">{bytes(j.bytesTotal)}</td>
            <td>{ago(j.startedAt)}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

function Pools({ pools, reload }: { pools: Pool[]; reload: () => void }) {
  const [name, setName] = useState('');
  const act = useAction();
  return (
    <Section title="Pools">
      <table aria-label="Pools">
        <thead><tr><th>Name</th><th>Policy layer</th><th><span class="sr-only">Actions</span></th></tr></thead>
        <tbody>
          {pools.length === 0 && <Empty cols={3} />}
          {pools.map((p) => (
            <tr key={p.id}>
              <td>{p.name}</td>
              <td>{Object.entries(p.policy).map(([k, v]) => <Badge key={k}>{`${k}=${String(v)}`}</Badge>)}</td>
              <td><button type="button" class="secondary" aria-label={`Delete pool ${p.name}`} onClick={() => void act.run(async () => { await api('DELETE', `/v1/admin/pools/${enc(p.id)}`); reload(); })}>Delete</button></td>
            </tr>
          ))}
        </tbody>
      </table>
      <form class="inline" aria-label="Create a pool" onSubmit={(e) => { e.preventDefault(); void act.run(async () => { await api('POST', '/v1/admin/pools', { name }); setName(''); reload(); }); }}>
        <Field label="New pool"><input value={name} onInput={(e) => setName(e.currentTarget.value)} required /></Field>
        <button type="submit" disabled={act.busy}>Create pool</button>
      </form>
      <Status error={act.error} />
    </Section>
  );
}

export function DesktopsPage() {
  const desktops = usePoll(() => get<{ desktops: AdminDesktop[] }>('/v1/admin/desktops'), 2000);
  const pools = usePoll(() => get<{ pools: Pool[] }>('/v1/admin/pools'), 5000);
  const [selected, setSelected] = useState<string | null>(null);
  const [cloneFrom, setCloneFrom] = useState('');
  const [cloneName, setCloneName] = useState('');
  const act = useAction();
  const list = desktops.data?.desktops ?? [];
  const poolName = (id: string | null) => pools.data?.pools.find((p) => p.id === id)?.name ?? '';
  const sel = list.find((d) => d.id === selected);
  return (
    <>
      <Section title="Desktops">
        <table aria-label="Desktops">
          <thead><tr><th>Name</th><th>Pool</th><th>State</th><th class="num">Disk</th><th class="num">vCPU / RAM</th><th>Lease</th><th><span class="sr-only">Actions</span></th></tr></thead>
          <tbody>
            {list.length === 0 && <Empty cols={7} text={desktops.data ? 'no desktops yet: import one below' : 'loading…'} />}
            {list.map((d) => (
              <tr key={d.id} data-desktop={d.name}>
                <td>{d.name}</td>
                <td>{poolName(d.poolId)}</td>
                <td>{d.checkout ? <Badge kind="warn">{`${d.checkout.state.replace('_', ' ')} by ${d.checkout.user}`}</Badge> : <Badge kind="ok">available</Badge>}</td>
                <td class="num">{bytes(d.config.disks.reduce((n, x) => n + x.sizeBytes, 0))}</td>
                <td class="num">{`${d.config.vcpus} / ${d.config.ramMiB} MiB`}</td>
                <td>{d.checkout ? left(d.checkout.leaseExpiresAt) : ''}</td>
                <td>
                  <button type="button" class="secondary" onClick={() => setSelected(selected === d.id ? null : d.id)} aria-expanded={selected === d.id} aria-label={`Restore points of ${d.name}`}>Restore points</button>{' '}
                  <button type="button" class="danger" aria-label={`Delete ${d.name}`} onClick={() => confirm(`Delete desktop ${d.name} and its snapshots?`) && void act.run(async () => { await api('DELETE', `/v1/admin/desktops/${enc(d.id)}`); desktops.reload(); return `deleted ${d.name}`; })}>Delete</button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
        <Status error={act.error ?? desktops.error} note={act.note} />
        {sel && <RestorePointList desktopId={sel.id} name={sel.name} admin />}
      </Section>
      <Section title="Import a desktop">
        <ImportForm pools={pools.data?.pools ?? []} onStarted={desktops.reload} />
        <Imports />
      </Section>
      <Section title="Clone a desktop">
        <form class="inline" aria-label="Clone a desktop" onSubmit={(e) => { e.preventDefault(); void act.run(async () => { await api('POST', '/v1/admin/desktops', { name: cloneName, cloneOf: cloneFrom }); setCloneName(''); desktops.reload(); return `cloned ${cloneFrom} as ${cloneName}`; }); }}>
          <Field label="Golden image">
            <select value={cloneFrom} onChange={(e) => setCloneFrom(e.currentTarget.value)} required>
              <option value="">(choose)</option>
              {list.map((d) => <option key={d.id} value={d.name}>{d.name}</option>)}
            </select>
          </Field>
          <Field label="New desktop name"><input value={cloneName} onInput={(e) => setCloneName(e.currentTarget.value)} required /></Field>
          <button type="submit" disabled={act.busy}>Clone</button>
        </form>
      </Section>
      <Pools pools={pools.data?.pools ?? []} reload={pools.reload} />
    </>
  );
}
