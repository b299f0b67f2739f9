import { useCallback, useEffect, useRef, useState } from 'preact/hooks';

/** Loads now and every `ms` while mounted (live views), without reloading the page. */
export function usePoll<T>(load: () => Promise<T>, ms: number, deps: unknown[] = []): { data: T | null; error: string | null; reload: () => void } {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<string | null>(null);
  const gen = useRef(0);
  const run = useCallback(() => {
    const mine = ++gen.current;
    load().then(
      (d) => {
        if (mine === gen.current) {
          setData(d);
          setError(null);
        }
      },
      (e: Error) => mine === gen.current && setError(e.message),
    );
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
  useEffect(() => {
    run();
    const t = setInterval(run, ms);
    return () => clearInterval(t);
  }, [run, ms]);
  return { data, error, reload: run };
}

/** Runs an action, keeping its error (or success note) to show beside the form. */
export function useAction(): { busy: boolean; error: string | null; note: string | null; run: (fn: () => Promise<string | void>) => Promise<void> } {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [note, setNote] = useState<string | null>(null);
  const run = async (fn: () => Promise<string | void>) => {
    setBusy(true);
    setError(null);
    setNote(null);
    try {
      const msg = await fn();
      if (msg) setNote(msg);
    } catch (e) {
      setError((e as Error).message);
    } finally {
      setBusy(false);
    }
  };
  return { busy, error, note, run };
}
