import { render } from 'preact';
import { useEffect, useState } from 'preact/hooks';
import { loadSession, login, setSession, whenExpired, type Session } from './api';
import { useAction } from './hooks';
import { AuditPage } from './pages/audit';
import { CheckoutsPage } from './pages/checkouts';
import { DesktopsPage } from './pages/desktops';
import { DevicesPage } from './pages/devices';
import { DirectoryPage } from './pages/directory';
import { DisplayPage, displayRoute } from './pages/display';
import { MyDesktopsPage } from './pages/my-desktops';
import { PoliciesPage } from './pages/policies';
import { TransfersPage } from './pages/transfers';
import { Field, Status } from './ui';
import './style.css';

const ADMIN_PAGES = [
  { id: 'desktops', title: 'Desktops & pools', view: DesktopsPage },
  { id: 'checkouts', title: 'Check-outs & locks', view: CheckoutsPage },
  { id: 'devices', title: 'Devices', view: DevicesPage },
  { id: 'transfers', title: 'Transfers', view: TransfersPage },
  { id: 'policies', title: 'Policies', view: PoliciesPage },
  { id: 'directory', title: 'Users & groups', view: DirectoryPage },
  { id: 'audit', title: 'Audit', view: AuditPage },
  { id: 'mine', title: 'My desktops', view: MyDesktopsPage },
];
const USER_PAGES = [{ id: 'mine', title: 'My desktops', view: MyDesktopsPage }];

function useHash(): string {
  const [hash, setHash] = useState(location.hash.replace(/^#\/?/, ''));
  useEffect(() => {
    const on = () => setHash(location.hash.replace(/^#\/?/, ''));
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return hash;
}

function Login({ onLogin }: { onLogin: (s: Session) => void }) {
  const [username, setUser] = useState('');
  const [password, setPassword] = useState('');
  const act = useAction();
  return (
    <main class="login">
      <h1>Carryon console</h1>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          void act.run(async () => onLogin(await login(username, password)));
        }}
      >
        <Field label="User name">
          <input name="username" autoComplete="username" value={username} onInput={(e) => setUser(e.currentTarget.value)} required />
        </Field>
        <Field label="Password">
          <input name="password" type="password" autoComplete="current-password" value={password} onInput={(e) => setPassword(e.currentTarget.value)} required />
        </Field>
        <button type="submit" disabled={act.busy}>Log in</button>
        <Status error={act.error} />
      </form>
      <p class="muted">The same accounts as the API and the <code>carryon</code> command (local or LDAP).</p>
    </main>
  );
}

function App() {
  const [session, setS] = useState<Session | null>(loadSession());
  const hash = useHash();
  useEffect(() => whenExpired(() => setS(null)), []);
  // A desktop's screen: its one-time ticket authorizes it (a link from `carryon open` needs no console login).
  const display = displayRoute(hash);
  if (display) return <main class="display-main"><h1 class="sr-only">Desktop screen</h1><DisplayPage {...display} /></main>;
  if (!session) return <Login onLogin={setS} />;
  const pages = session.user.role === 'admin' ? ADMIN_PAGES : USER_PAGES;
  const page = pages.find((p) => p.id === hash) ?? pages[0]!;
  const View = page.view;
  return (
    <>
      <header>
        <span class="brand">Carryon</span>
        <nav aria-label="Pages">
          <ul>
            {pages.map((p) => (
              <li key={p.id}>
                <a href={`#/${p.id}`} aria-current={p.id === page.id ? 'page' : undefined}>{p.title}</a>
              </li>
            ))}
          </ul>
        </nav>
        <span class="who">
          {session.user.name} ({session.user.role}){' '}
          <button
            type="button"
            class="link"
            onClick={() => {
              setSession(null);
              setS(null);
            }}
          >
            Log out
          </button>
        </span>
      </header>
      <main>
        <h1>{page.title}</h1>
        <View session={session} />
      </main>
    </>
  );
}

render(<App />, document.getElementById('app')!);
