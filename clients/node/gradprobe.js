'use strict';
// A GradProbe client for Node, built at run time from proto/gradprobe/v1/reliability.proto
// with @grpc/proto-loader: nothing generated, nothing copied from the Python side, so it
// proves the .proto alone is the contract.
//
//   const { connect, imageFromFile } = require('./gradprobe');
//   const client = connect('127.0.0.1:50051');
//   const response = await client.assess({ images: [imageFromFile('shirt.png')] });

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.resolve(__dirname, '..', '..', 'proto');
const RELIABILITY_PROTO = 'gradprobe/v1/reliability.proto';
// grpc.health.v1 as published by the gRPC project (the grpc-health-check package).
const HEALTH_PROTO = path.join(
  path.dirname(require.resolve('grpc-health-check/package.json')),
  'proto',
  'health',
  'v1',
  'health.proto',
);

// Field names as in the .proto (request_id, predicted_class), enums as their names.
const LOADER_OPTIONS = { keepCase: true, enums: String, longs: String, defaults: true, oneofs: true };
const MAX_MESSAGE_BYTES = 64 * 1024 * 1024;

/** The package definitions: { Reliability, Health } service constructors. */
function loadServices(protoDir = PROTO_DIR) {
  const reliability = grpc.loadPackageDefinition(
    protoLoader.loadSync(RELIABILITY_PROTO, { ...LOADER_OPTIONS, includeDirs: [protoDir] }),
  );
  const health = grpc.loadPackageDefinition(protoLoader.loadSync(HEALTH_PROTO, LOADER_OPTIONS));
  return { Reliability: reliability.gradprobe.v1.Reliability, Health: health.grpc.health.v1.Health };
}

/** Channel credentials: plaintext without a CA; TLS with it; mutual TLS with a key pair too. */
function channelCredentials({ ca, cert, key } = {}) {
  if (!ca && !cert && !key) return grpc.credentials.createInsecure();
  if (Boolean(cert) !== Boolean(key)) throw new Error('mutual TLS needs both cert and key');
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(ca), read(key), read(cert));
}

/**
 * A connected client. options: ca, cert, key (PEM file paths), token (sent as
 * `authorization: Bearer <token>` on every call), serverName (the TLS name to verify when it
 * differs from the target's host), timeoutMs (each call's deadline), protoDir.
 */
function connect(target, options = {}) {
  const { Reliability, Health } = loadServices(options.protoDir);
  const channelOptions = {
    'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  };
  if (options.serverName) channelOptions['grpc.ssl_target_name_override'] = options.serverName;
  const credentials = channelCredentials(options);
  const stub = new Reliability(target, credentials, channelOptions);
  const health = new Health(target, credentials, channelOptions);
  const timeoutMs = options.timeoutMs ?? 60000;

  // Per-call metadata rather than call credentials: grpc-js refuses call credentials on a
  // plaintext channel, and the server decides whether it accepts a token without TLS.
  const metadata = () => {
    const m = new grpc.Metadata();
    if (options.token) m.set('authorization', `Bearer ${options.token}`);
    return m;
  };
  const callOptions = () => ({ deadline: Date.now() + timeoutMs });
  const unary = (client, method) => (request) =>
    new Promise((resolve, reject) => {
      client[method](request, metadata(), callOptions(), (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });

  return {
    assess: unary(stub, 'Assess'),
    predict: unary(stub, 'Predict'),
    modelInfo: (model = '') => unary(stub, 'GetModelInfo')({ model }),
    listModels: () => unary(stub, 'ListModels')({}),
    /** The serving status name (SERVING, NOT_SERVING) of a service; '' is the server's. */
    health: async (service = '') => (await unary(health, 'Check')({ service })).status,
    /**
     * A bidirectional stream: write requests with `call.write(request)`, `call.end()` when
     * done; the call is an async iterable of responses, one per request, in request order.
     */
    assessStream: () => stub.AssessStream(metadata(), callOptions()),
    close: () => {
      stub.close();
      health.close();
    },
  };
}

/** An Image of raw pixels: a Float32Array (values in [0, 1]) or a Uint8Array (0..255). */
function rawImage(pixels, shape) {
  let dtype;
  if (pixels instanceof Float32Array) dtype = 'FLOAT32';
  else if (pixels instanceof Uint8Array) dtype = 'UINT8';
  else throw new Error('raw pixels must be a Float32Array or a Uint8Array');
  // The proto says little-endian float32; copy byte by byte so the host's order never matters.
  const data = Buffer.alloc(pixels.length * pixels.BYTES_PER_ELEMENT);
  if (dtype === 'FLOAT32') pixels.forEach((value, i) => data.writeFloatLE(value, 4 * i));
  else data.set(pixels);
  return { raw: { data, shape: [...shape], dtype } };
}

/** An Image of an encoded PNG or JPEG file's bytes. */
function encodedImage(bytes) {
  return { encoded: Buffer.from(bytes) };
}

/** Pixels and shape of a NumPy .npy file holding one little-endian float32 or uint8 array. */
function readNpy(file) {
  const bytes = fs.readFileSync(file);
  if (bytes.subarray(0, 6).toString('latin1') !== '\x93NUMPY') throw new Error(`${file}: not a .npy file`);
  const major = bytes[6];
  const headerLength = major === 1 ? bytes.readUInt16LE(8) : bytes.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = bytes.subarray(start, start + headerLength).toString('latin1');
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)
    .map(Number);
  if (fortran) throw new Error(`${file}: Fortran-ordered arrays are not supported`);
  const body = bytes.subarray(start + headerLength);
  if (descr === '<f4') {
    const pixels = new Float32Array(body.length / 4);
    for (let i = 0; i < pixels.length; i += 1) pixels[i] = body.readFloatLE(4 * i);
    return { pixels, shape };
  }
  if (descr === '|u1') return { pixels: new Uint8Array(body), shape };
  throw new Error(`${file}: dtype ${descr}; save float32 or uint8 pixels`);
}

/** An Image from a file: .npy (raw pixels, the array's shape) or a PNG/JPEG (encoded). */
function imageFromFile(file) {
  if (file.toLowerCase().endsWith('.npy')) {
    const { pixels, shape } = readNpy(file);
    return rawImage(pixels, shape);
  }
  return encodedImage(fs.readFileSync(file));
}

/** A gRPC error as plain data: { code, code_name, details }. */
function errorData(error) {
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === error.code);
  return { code: error.code, code_name: name ?? 'UNKNOWN', details: error.details ?? String(error) };
}

module.exports = {
  connect,
  loadServices,
  rawImage,
  encodedImage,
  readNpy,
  imageFromFile,
  errorData,
  status: grpc.status,
};
