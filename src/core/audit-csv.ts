/** An audit event as the broker stores and serves it. */
export interface AuditEvent { id: number; time: string; actor: string; desktopId: string | null; action: string; outcome: string; detail: string | null }

const cell = (v: unknown) => {
  const s = v === null || v === undefined ? '' : String(v);
  // Quote always; a leading = + - @ would be a formula in a spreadsheet.
  return `"${(/^[=+\-@]/.test(s) ? `'${s}` : s).replace(/"/g, '""')}"`;
};

/** The audit export format (console download, `carryon admin events --csv`). */
export function eventsCsv(events: AuditEvent[]): string {
  const cols: (keyof AuditEvent)[] = ['id', 'time', 'actor', 'desktopId', 'action', 'outcome', 'detail'];
  return `${cols.join(',')}\n${events.map((e) => cols.map((c) => cell(e[c])).join(',')).join('\n')}\n`;
}
