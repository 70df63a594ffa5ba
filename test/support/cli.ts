/**
 * The `nnsight-ts` command line run from source in a child process
 * (`node --import tsx`), for tests and benchmarks that need a server of
 * their own.
 */
import { type ChildProcess, spawn } from "node:child_process"
import * as path from "node:path"
import { fileURLToPath } from "node:url"

/** The repository root. */
export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..")

/**
 * Starts `nnsight-ts <args>` from `src/remote/Cli.ts`.
 *
 * @example
 * const child = spawnCli(["serve", "--model", "models/stories260K", "--port", "0"])
 */
export const spawnCli = (args: ReadonlyArray<string>, env: NodeJS.ProcessEnv = {}): ChildProcess =>
  spawn(
    process.execPath,
    [
      "--import",
      "tsx",
      "--input-type=module",
      "-e",
      `const { main } = await import(${JSON.stringify(path.join(root, "src/remote/Cli.ts"))}); main(process.argv.slice(1))`,
      "--",
      ...args
    ],
    { cwd: root, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env } }
  )
