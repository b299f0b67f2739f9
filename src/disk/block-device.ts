/** A block device as the NBD server (or any other consumer) sees it. */
export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  read(offset: number, length: number): Promise<Buffer>;
  write(offset: number, data: Buffer, fua?: boolean): Promise<void>;
  writeZeroes(offset: number, length: number, fua?: boolean): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}
