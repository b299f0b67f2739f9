/** The documented broker API (docs/api.md), from the page's origin, with the session's bearer token. */
export type Json = Record<string, unknown>;

export class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string, readonly body: Json = {}) {
    super(message);
  }
}

export interface Session {
  token: string;
  expiresAt: string;
  user: { name: string; role: 'admin' | 'user'; groups?: string[] };
}

const KEY = 'carryon.session';

export function loadSession(): Session | null {
  try {
    const s = JSON.parse(sessionStorage.getItem(KEY) ?? 'null') as Session | null;
    return s && Date.parse(s.expiresAt) > Date.now() ? s : null;
  } catch {
    return null;
  }
}

let session: Session | null = loadSession();
let onExpired: () => void = () => undefined;

export function setSession(s: Session | null): void {
  session = s;
  if (s) sessionStorage.setItem(KEY, JSON.stringify(s));
  else sessionStorage.removeItem(KEY);
}
export function whenExpired(fn: () => void): void {
  onExpired = fn;
}

async function raw(method: string, path: string, body?: BodyInit | null, type?: string): Promise<Response> {
  const headers: Record<string, string> = {};
  if (type) headers['content-type'] = type;
  if (session) headers.authorization = `Bearer ${session.token}`;
  const res = await fetch(path, { method, headers, body });
  if (res.status === 401 && session && !path.startsWith('/v1/auth/')) {
    setSession(null);
    onExpired();
  }
  if (!res.ok) {
    let b: Json = {};
    try {
      b = (await res.json()) as Json;
    } catch {
      /* not JSON */
    }
    throw new ApiError(res.status, String(b.error ?? res.status), String(b.message ?? res.statusText), b);
  }
  return res;
}

export async function api<T = Json>(method: string, path: string, body?: unknown): Promise<T> {
  const res = await raw(method, path, body === undefined ? undefined : JSON.stringify(body), body === undefined ? undefined : 'application/json');
  return (await res.json()) as T;
}

export const get = <T = Json>(path: string) => api<T>('GET', path);

/** A binary body (resumable image upload). */
export async function putBytes<T = Json>(path: string, bytes: Blob): Promise<T> {
  return (await (await raw('PUT', path, bytes, 'application/octet-stream')).json()) as T;
}

/** Fetches with the bearer token and hands the result to the browser as a file download. */
export async function download(path: string, filename: string): Promise<void> {
  const blob = await (await raw('GET', path)).blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

export async function login(username: string, password: string): Promise<Session> {
  const s = await api<Session>('POST', '/v1/auth/login', { username, password });
  setSession(s);
  return s;
}

export const enc = encodeURIComponent;
