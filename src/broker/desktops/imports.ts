import { randomUUID } from 'node:crypto';
import type { BrokerContext } from '../context.js';
import { createDesktopFromImage, type CreateDesktop } from './desktops.js';
import { HttpError } from '../http.js';
import { inspectForImport } from './image-checks.js';

export interface ImportJobView {
  id: string;
  name: string;
  image: string;
  state: 'running' | 'done' | 'failed';
  bytesDone: number;
  bytesTotal: number;
  startedAt: string;
  finishedAt: string | null;
  /** The new desktop's id and import summary, once done. */
  result: Record<string, unknown> | null;
  error: { code: string; message: string } | null;
}

/**
 * Desktop imports that run in the background: a large image takes minutes, longer than an HTTP
 * request should wait, so the admin gets a job to poll (progress in bytes). Jobs live in memory;
 * an import cut short by a broker restart leaves no desktop (and its blobs as unreferenced data).
 */
const nameTaken = (name: string) => new HttpError(409, 'exists', `desktop ${name} exists or is being imported`);

export class ImportJobs {
  private readonly jobs = new Map<string, ImportJobView>();

  /** Checks what can be checked at once (name free, image readable), then imports in the background. */
  async start(ctx: BrokerContext, actor: string, req: CreateDesktop, onFinish?: (ok: boolean) => void): Promise<ImportJobView> {
    await this.ensureNameFree(ctx, req.name);
    const size = await inspectForImport(req.image, req.chunkSize);
    // Again (inspecting took a moment): the job is registered before the database is asked, so
    // a second import of the name that starts meanwhile sees it running.
    if (this.running(req.name)) throw nameTaken(req.name);
    const job: ImportJobView = {
      id: randomUUID(), name: req.name, image: req.image, state: 'running', bytesDone: 0, bytesTotal: size,
      startedAt: new Date().toISOString(), finishedAt: null, result: null, error: null,
    };
    this.jobs.set(job.id, job);
    if (await ctx.meta.getDesktop(req.name)) {
      this.jobs.delete(job.id);
      throw nameTaken(req.name);
    }
    this.forgetOldest();
    void createDesktopFromImage(ctx, actor, req, (p) => (job.bytesDone = p.bytesDone)).then(
      (res) => Object.assign(job, { state: 'done', result: res, bytesDone: job.bytesTotal, finishedAt: new Date().toISOString() }),
      (err: Error & { code?: string }) => Object.assign(job, { state: 'failed', error: { code: err.code ?? 'import-failed', message: err.message }, finishedAt: new Date().toISOString() }),
    ).finally(() => onFinish?.(job.state === 'done'));
    return { ...job };
  }

  /** Keeps every running job and the latest finished ones (a long-lived broker imports a lot). */
  private forgetOldest(keepFinished = 100): void {
    const finished = [...this.jobs.values()].filter((j) => j.state !== 'running');
    for (const j of finished.slice(0, Math.max(0, finished.length - keepFinished))) this.jobs.delete(j.id);
  }

  get(id: string): ImportJobView | undefined {
    const j = this.jobs.get(id);
    return j && { ...j };
  }

  list(): ImportJobView[] {
    return [...this.jobs.values()].map((j) => ({ ...j }));
  }

  /** A name is taken by a desktop or by an import still running. */
  async ensureNameFree(ctx: BrokerContext, name: string): Promise<void> {
    if (this.running(name) || (await ctx.meta.getDesktop(name))) throw nameTaken(name);
  }

  private running(name: string): boolean {
    return [...this.jobs.values()].some((j) => j.state === 'running' && j.name === name);
  }
}
