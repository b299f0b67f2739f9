import RFB from '@novnc/novnc';
import { useEffect, useRef, useState } from 'preact/hooks';
import { api } from '../api';

/** Asks the broker for a one-time ticket and opens the display page with it (the page's WebSocket cannot carry the bearer token). */
export async function openDisplay(desktopId: string): Promise<void> {
  const t = await api<{ url: string }>('POST', `/v1/desktops/${encodeURIComponent(desktopId)}/display-ticket`, {});
  location.hash = new URL(t.url).hash;
}

/** `display/<desktop id>?ticket=…` from the page's fragment, or null. */
export function displayRoute(hash: string): { desktopId: string; ticket: string } | null {
  const m = /^display\/([^?/]+)\?(.*)$/.exec(hash);
  const ticket = m ? new URLSearchParams(m[2]).get('ticket') : null;
  return m && ticket ? { desktopId: decodeURIComponent(m[1]!), ticket } : null;
}

type Phase = 'connecting' | 'connected' | 'ended';

/**
 * A desktop's screen (noVNC over the broker's WebSocket, authorized by the one-time ticket): scaled
 * to the window; keyboard and mouse go to the guest while the screen has focus.
 */
export function DisplayPage({ desktopId, ticket }: { desktopId: string; ticket: string }) {
  const screen = useRef<HTMLDivElement>(null);
  const rfb = useRef<RFB | null>(null);
  const [phase, setPhase] = useState<Phase>('connecting');
  const [note, setNote] = useState('');
  useEffect(() => {
    const url = `wss://${location.host}/v1/desktops/${encodeURIComponent(desktopId)}/display?ticket=${encodeURIComponent(ticket)}`;
    // The ticket is spent by this connection: it leaves the address bar (a reload asks for a new one).
    history.replaceState(null, '', `${location.pathname}#/display/${encodeURIComponent(desktopId)}`);
    const r = new RFB(screen.current!, url, { shared: true });
    r.scaleViewport = true;
    r.resizeSession = false;
    r.focusOnClick = true;
    r.addEventListener('connect', () => {
      setPhase('connected');
      r.focus();
    });
    r.addEventListener('disconnect', (e) => {
      setPhase('ended');
      setNote((e as CustomEvent<{ clean: boolean }>).detail.clean ? 'The display was closed.' : 'The display could not be opened or was cut off (the ticket may be used or expired, or the desktop stopped). Open it again from My desktops.');
    });
    r.addEventListener('securityfailure', () => setNote('The desktop refused the connection.'));
    rfb.current = r;
    return () => r.disconnect();
  }, [desktopId, ticket]);
  return (
    <div class="display">
      <div class="display-bar" role="toolbar" aria-label="Display controls">
        <a href="#/mine">My desktops</a>
        <span role="status" aria-live="polite">{phase === 'connecting' ? 'Connecting…' : phase === 'connected' ? 'Connected' : note}</span>
        <button type="button" disabled={phase !== 'connected'} onClick={() => rfb.current?.sendCtrlAltDel()}>Send Ctrl-Alt-Del</button>
      </div>
      <div class="display-screen" ref={screen} role="application" aria-label={`Screen of desktop ${desktopId}`} tabIndex={-1} />
    </div>
  );
}
