/**
 * Where in the user's code a node was recorded: the first stack frame outside
 * nnsight-ts itself, as `file:line:column`.
 *
 * @example
 * import * as Site from "./Site.js"
 * Site.here() // "/home/me/experiment.ts:12:20"
 *
 * @since 0.1.0
 */
import { fileURLToPath } from "node:url"
import * as path from "node:path"

// src/core/Site.ts (or dist/core/Site.js): the library root is two levels up
const libraryRoot = path.dirname(path.dirname(fileURLToPath(import.meta.url))) + path.sep

const frame = /\(?((?:file:\/\/)?[^\s()]+):(\d+):(\d+)\)?$/

/**
 * A site captured now but read later: capturing the stack is cheap, turning
 * it into text (with source maps) is not, and most sites are never read.
 *
 * @since 0.1.0
 */
export type Lazy = string | Error

/**
 * Captures the current stack for a later {@link format}.
 *
 * @since 0.1.0
 */
export const capture = (): Lazy => new Error()

/**
 * The user's `file:line:column` of a captured site.
 *
 * @since 0.1.0
 */
export const format = (site: Lazy): string => (typeof site === "string" ? site : fromStack(site.stack))

/**
 * The user's `file:line:column` calling into nnsight-ts now ("" if unknown).
 *
 * @since 0.1.0
 */
export const here = (): string => fromStack(new Error().stack)

const fromStack = (stack: string | undefined): string => {
  if (stack === undefined) return ""
  for (const line of stack.split("\n").slice(1)) {
    const m = frame.exec(line.trim())
    if (m === null) continue
    let file = m[1]
    if (file.startsWith("file://")) file = fileURLToPath(file)
    if (file.startsWith(libraryRoot) || file.startsWith("node:") || file.includes("/node_modules/effect/")) continue
    return `${file}:${m[2]}:${m[3]}`
  }
  return ""
}
