'use strict';
// The launcher's undici (scripts/bundle-cli.mjs): what Carryon imports from it (Agent, buildConnector,
// request) without undici's index, which also loads fetch, WebSocket, cookies, caches and mocks, and
// through them Node's own bundled copy of undici (File, Headers): ≈ 1 MB more to compile at every start.
// `request` is undici's own top-level `request` (index.js `makeDispatcher(api.request)`), kept in step
// with the installed version by test/cli/launcher.test.ts and every CLI test.
const Agent = require('undici/lib/dispatcher/agent');
const Dispatcher = require('undici/lib/dispatcher/dispatcher');
const api = require('undici/lib/api');
const buildConnector = require('undici/lib/core/connect');
const util = require('undici/lib/core/util');
const { InvalidArgumentError } = require('undici/lib/core/errors');
const { getGlobalDispatcher } = require('undici/lib/global');

Object.assign(Dispatcher.prototype, api);

function makeDispatcher (fn) {
  return (url, opts, handler) => {
    if (typeof opts === 'function') {
      handler = opts;
      opts = null;
    }
    if (!url || (typeof url !== 'string' && typeof url !== 'object' && !(url instanceof URL))) throw new InvalidArgumentError('invalid url');
    if (opts != null && typeof opts !== 'object') throw new InvalidArgumentError('invalid opts');
    if (opts && opts.path != null) {
      if (typeof opts.path !== 'string') throw new InvalidArgumentError('invalid opts.path');
      let path = opts.path;
      if (!opts.path.startsWith('/')) path = `/${path}`;
      url = new URL(util.parseOrigin(url).origin + path);
    } else {
      if (!opts) opts = typeof url === 'object' ? url : {};
      url = util.parseURL(url);
    }
    const { agent, dispatcher = getGlobalDispatcher() } = opts;
    if (agent) throw new InvalidArgumentError('unsupported opts.agent. Did you mean opts.client?');
    return fn.call(dispatcher, { ...opts, origin: url.origin, path: url.search ? `${url.pathname}${url.search}` : url.pathname, method: opts.method || (opts.body ? 'PUT' : 'GET') }, handler);
  };
}

module.exports = { Agent, Dispatcher, buildConnector, request: makeDispatcher(api.request) };
