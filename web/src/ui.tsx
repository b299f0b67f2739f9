import { cloneElement, type ComponentChildren, type VNode } from 'preact';
import { useId } from 'preact/hooks';

export function Progress({ percent, label }: { percent: number | null; label: string }) {
  if (percent === null) return <span>{label}</span>;
  const p = Math.max(0, Math.min(100, percent));
  return (
    <span class="progress">
      <progress max={100} value={p} aria-label={label} />
      <span class="pct">{`${p.toFixed(p % 1 ? 1 : 0)}%`}</span>
    </span>
  );
}

export function Status({ error, note }: { error?: string | null; note?: string | null }) {
  return (
    <>
      {error && <p class="error" role="alert">{error}</p>}
      {note && <p class="note" role="status">{note}</p>}
    </>
  );
}

export function Section({ title, children, actions }: { title: string; children: ComponentChildren; actions?: ComponentChildren }) {
  return (
    <section aria-label={title}>
      <div class="section-head">
        <h2>{title}</h2>
        {actions}
      </div>
      {children}
    </section>
  );
}

/** A labelled control: the label names the control alone (not the options inside it). */
export function Field({ label, children, hint }: { label: string; children: VNode<Record<string, unknown>>; hint?: string }) {
  const id = useId();
  return (
    <div class="field">
      <label for={id}>{label}</label>
      {cloneElement(children, { id, ...(hint ? { 'aria-describedby': `${id}-hint` } : {}) })}
      {hint && <small id={`${id}-hint`}>{hint}</small>}
    </div>
  );
}

export function Empty({ cols, text = 'none' }: { cols: number; text?: string }) {
  return (
    <tr>
      <td colSpan={cols} class="muted">{text}</td>
    </tr>
  );
}

export function Badge({ kind, children }: { kind?: string; children: ComponentChildren }) {
  return <span class={`badge ${kind ?? ''}`}>{children}</span>;
}
