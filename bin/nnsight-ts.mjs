#!/usr/bin/env node
// The nnsight-ts command line (see src/remote/Cli.ts): the built module when
// the package is built (dist/), else the TypeScript source through tsx (a
// development checkout).
import { existsSync } from "node:fs"
import * as path from "node:path"
import { fileURLToPath, pathToFileURL } from "node:url"

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
const built = path.join(root, "dist", "remote", "Cli.js")
let cli
if (existsSync(built)) {
  cli = await import(pathToFileURL(built).href)
} else {
  const { register } = await import("tsx/esm/api")
  register()
  cli = await import(pathToFileURL(path.join(root, "src", "remote", "Cli.ts")).href)
}
cli.main(process.argv.slice(2))
