/** One measured figure in BENCHMARKS.md, with the peer it is judged against (same run). */
export interface BenchRow {
  section: string;
  name: string;
  /** Median over `runs`. */
  value: number;
  unit: string;
  runs: number;
  /** (max − min) / median over the runs, as a fraction. */
  spread: number;
  peer?: { name: string; value: number; unit: string };
  /** Target met / missed, or context a reader needs. */
  note?: string;
}

export interface BenchSection {
  name: string;
  run(): Promise<BenchRow[]>;
}
