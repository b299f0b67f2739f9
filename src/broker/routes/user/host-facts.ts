import { z } from 'zod';

/** What a laptop says of itself at enrolment and check-out. */
export const Host = z.object({
  os: z.string().max(200).optional(),
  cpus: z.number().int().min(1).max(4096),
  ramBytes: z.number().int().min(0),
  freeDiskBytes: z.number().int().min(0),
});
/** A desktop's or a check-out's id (or a desktop's name) in a route's path. */
export const Id = z.object({ id: z.string().min(1).max(200) });
