#!/usr/bin/env node
'use strict';
// Command line over gradprobe.js; every answer is JSON on stdout (field names as in the proto).
// A failed call prints {"error": {"code", "code_name", "details"}} and exits 2.

const readline = require('node:readline');
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { connect, imageFromFile, errorData } = require('./gradprobe');

const USAGE = `usage: node cli.js [options] COMMAND
commands:
  health [SERVICE]             the serving status ('' is the whole server)
  info                         GetModelInfo (--model NAME: one of several)
  models                       ListModels
  assess IMAGE...              one Assess request; IMAGE: .npy (raw pixels) or PNG/JPEG
  stream                       AssessStream; stdin: one JSON request a line,
                               {"request_id": "a", "images": ["x.npy", "y.png"]}
options:
  --target HOST:PORT           default $GRADPROBE_TARGET or 127.0.0.1:50051
  --model NAME  --request-id ID
  --ca FILE                    TLS: the CA that signed the server's certificate
  --cert FILE --key FILE       mutual TLS: this client's certificate and key
  --token-file FILE            sends "authorization: Bearer <token>" with its first token
                               (one a line, # comments); or $GRADPROBE_TOKEN
  --server-name NAME           the name the server's certificate must carry
  --timeout-ms N               each call's deadline (default 60000)`;

const OPTIONS = {
  target: { type: 'string', default: process.env.GRADPROBE_TARGET || '127.0.0.1:50051' },
  model: { type: 'string', default: '' },
  'request-id': { type: 'string', default: '' },
  ca: { type: 'string' },
  cert: { type: 'string' },
  key: { type: 'string' },
  'token-file': { type: 'string' },
  'server-name': { type: 'string' },
  'timeout-ms': { type: 'string', default: '60000' },
  help: { type: 'boolean', short: 'h' },
};

const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

/** The first token of a token file in the server's format: one a line, # comments. */
function readToken(file) {
  const lines = fs.readFileSync(file, 'utf8').split(/\r?\n/).map((line) => line.trim());
  const token = lines.find((line) => line && !line.startsWith('#'));
  if (!token) throw new Error(`${file} holds no token`);
  return token;
}

async function stream(client, model) {
  const call = client.assessStream();
  // Requests go out as stdin yields them while the answers come back: a real pipeline.
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  let badLine = null;
  const sending = (async () => {
    for await (const line of lines) {
      if (!line.trim()) continue;
      const request = JSON.parse(line);
      call.write({
        request_id: request.request_id ?? '',
        model: request.model ?? model,
        images: request.images.map(imageFromFile),
      });
    }
    call.end();
  })().catch((error) => {
    badLine = error;
    call.cancel();
  });
  try {
    for await (const response of call) print(response);
  } catch (error) {
    throw badLine ?? error; // a local mistake is reported as itself, not as CANCELLED
  }
  await sending;
  if (badLine) throw badLine;
}

async function main() {
  const { values, positionals } = parseArgs({ options: OPTIONS, allowPositionals: true });
  const [command, ...rest] = positionals;
  if (values.help || !command) {
    process.stdout.write(`${USAGE}\n`);
    return values.help ? 0 : 1;
  }
  const tokenFile = values['token-file'];
  const client = connect(values.target, {
    ca: values.ca,
    cert: values.cert,
    key: values.key,
    token: tokenFile ? readToken(tokenFile) : process.env.GRADPROBE_TOKEN,
    serverName: values['server-name'],
    timeoutMs: Number(values['timeout-ms']),
  });
  try {
    if (command === 'health') print({ status: await client.health(rest[0] ?? '') });
    else if (command === 'info') print(await client.modelInfo(values.model));
    else if (command === 'models') print(await client.listModels());
    else if (command === 'assess') {
      const images = rest.map(imageFromFile);
      print(await client.assess({ images, request_id: values['request-id'], model: values.model }));
    } else if (command === 'stream') await stream(client, values.model);
    else {
      process.stderr.write(`unknown command ${command}\n${USAGE}\n`);
      return 1;
    }
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error;
    print({ error: errorData(error) });
    return 2;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    process.stderr.write(`${error.stack ?? error}\n`);
    process.exitCode = 1;
  },
);
