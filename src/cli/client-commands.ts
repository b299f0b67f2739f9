import type { Command } from 'commander';

/** Registers the `carryon` commands of this area (filled in by its issue). */
export function registerClientCommands(_program: Command): void {}
