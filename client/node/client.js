'use strict';
// A Node.js client for lookalike.v1.ImageSimilarity, loaded at run time from the repository's protos/.
const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync('lookalike/v1/lookalike.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const lookalike = grpc.loadPackageDefinition(definition).lookalike.v1;

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024; // the server's default limit
// The retry policy every lookalike client loads: UNAVAILABLE and CANCELLED (a call cut by a worker's shutdown)
// retried by gRPC itself with jittered backoff, within the call's one deadline.
const SERVICE_CONFIG = fs.readFileSync(path.join(PROTO_ROOT, 'lookalike', 'v1', 'service_config.json'), 'utf8');

// TLS from PEM files: the CA that signed the server's certificate, and for mTLS this client's certificate
// and key; plaintext when none is given.
function credentialsFrom({ rootCa, clientCert, clientKey }) {
  if (rootCa === undefined && clientCert === undefined && clientKey === undefined) {
    return grpc.credentials.createInsecure();
  }
  if ((clientCert === undefined) !== (clientKey === undefined)) {
    throw new Error('clientCert and clientKey go together (mTLS)');
  }
  const read = (file) => (file === undefined ? null : fs.readFileSync(file));
  return grpc.credentials.createSsl(read(rootCa), read(clientKey), read(clientCert));
}

// What FindSimilar and Recommend share, as request fields.
function sharedOptions({
  k = 10, searchK = 0, groupSize = 0, withAttributes = false, scoreThreshold, diversity, candidates = 0, filter,
} = {}) {
  const request = { k, searchK, groupSize, withAttributes, candidates, filter: filter ?? {} };
  if (scoreThreshold !== undefined) request.scoreThreshold = scoreThreshold;
  if (diversity !== undefined) request.diversity = diversity;
  return request;
}

class ImageSimilarityClient {
  /**
   * @param {string} address host:port
   * @param {{timeoutMs?: number, rootCa?: string, clientCert?: string, clientKey?: string,
   *   credentials?: grpc.ChannelCredentials}} [options] timeoutMs: each call's deadline, retries included
   *   (10 s); rootCa: PEM file of the CA that signed the server's certificate (TLS); clientCert and clientKey:
   *   PEM files of this client's certificate and key (mTLS); or any grpc-js credentials.
   */
  constructor(address, options = {}) {
    this.timeoutMs = options.timeoutMs ?? 10000;
    this.stub = new lookalike.ImageSimilarity(address, options.credentials ?? credentialsFrom(options), {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
      'grpc.enable_retries': 1,
      'grpc.service_config': SERVICE_CONFIG,
      // gRPC retries only a request it kept, by default up to 1 MiB (16 MiB for the channel): a photo is kept whole.
      'grpc.per_rpc_retry_buffer_size': MAX_MESSAGE_BYTES,
      'grpc.retry_buffer_size': 4 * MAX_MESSAGE_BYTES,
    });
  }

  _call(method, request) {
    const deadline = new Date(Date.now() + this.timeoutMs);
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
    });
  }

  /**
   * @param {Buffer[]} images encoded images
   * @param {object[]} [regions] one {xMin, yMin, xMax, yMax} per image (relative to its size): embed only those parts
   */
  async embed(images, regions = []) {
    const response = await this._call('Embed', { images, regions });
    return { vectors: response.vectors.map((v) => v.values), modelVersion: response.modelVersion };
  }

  /**
   * The k products most like one query: an encoded image, a catalogue image id, a product id or a vector.
   * @param {{image?: Buffer, imageId?: string, productId?: string, vector?: number[]}} query
   * @param {object} [options] k, excludeQuery, searchK, groupSize, withAttributes, scoreThreshold, diversity
   *   (0..1: MMR among the `candidates` most relevant products; unset or 0: the plain ranking), candidates (0:
   *   the server's default, 4 x k within its bounds), and filter: {clauses: [{key, anyOf: [...]} | {key, noneOf: [...]} |
   *   {key, range: {gt, gte, lt, lte}} (a number key; any of the bounds)], excludeProductIds: [...]} (clauses AND
   *   together; parseClause reads 'KEY=V1,V2', 'KEY!=V', 'KEY<X', 'KEY>=X' ...); region {xMin, yMin, xMax, yMax} (relative to the image's
   *   size) searches with that part of an image query; queryExpansion {alpha?, results?} (an image or vector
   *   query; {} for the server's defaults; parseQueryExpansion reads '3,5') searches again with the query averaged
   *   with its `results` most similar products weighted by score^alpha.
   *   excludeQuery unset lets the server decide, as for every client: the query's own product is left out of
   *   an imageId or productId query and kept for an image or vector; true or false asks for one.
   */
  async findSimilar(query, { excludeQuery, region, queryExpansion, ...options } = {}) {
    const given = ['image', 'imageId', 'productId', 'vector'].filter((name) => query[name] !== undefined);
    if (given.length !== 1) throw new Error('findSimilar needs exactly one of image, imageId, productId or vector');
    const request = sharedOptions(options);
    if (excludeQuery !== undefined) request.excludeQuery = excludeQuery;
    if (region !== undefined) request.region = region;
    if (queryExpansion !== undefined) request.queryExpansion = queryExpansion;
    if (query.vector) request.vector = { values: query.vector };
    else request[given[0]] = query[given[0]];
    return this._call('FindSimilar', request);
  }

  /**
   * The k products most like the positive examples and least like the negative ones. An example is
   * {productId}, {imageId}, {image: Buffer, region?: {xMin, yMin, xMax, yMax}} or {vector: number[]}; strategy
   * 'average_vector', 'best_score' or 'sum_scores'.
   * @param {object[]} positive
   * @param {object[]} negative
   * @param {object} [options] the findSimilar options plus strategy and ignoreMissing
   */
  async recommend(positive, negative = [], { strategy = 'average_vector', ignoreMissing = false, ...options } = {}) {
    const example = (e) => (e.vector ? { vector: { values: e.vector } } : e);
    return this._call('Recommend', {
      ...sharedOptions(options),
      positive: positive.map(example),
      negative: negative.map(example),
      strategy: `RECOMMEND_STRATEGY_${strategy.toUpperCase()}`,
      ignoreMissing,
    });
  }

  async info() {
    return this._call('GetInfo', {});
  }

  close() {
    this.stub.close();
  }
}

// A clause as every lookalike command line writes it: an identifier, an operator, the value(s).
const CLAUSE = /^([A-Za-z_][A-Za-z0-9_]*)(!=|>=|<=|=|>|<)(.*)$/;
const RANGES = { '>': 'gt', '>=': 'gte', '<': 'lt', '<=': 'lte' };

/**
 * KEY=V1,V2 (any of), KEY!=V1,V2 (none of), or KEY<X, KEY<=X, KEY>X, KEY>=X (a range over a number attribute), as
 * a Clause; an Error saying what is wrong otherwise.
 */
function parseClause(text) {
  const parts = CLAUSE.exec(text);
  if (!parts) throw new Error(`${JSON.stringify(text)} is not KEY=V1,V2, KEY!=V1,V2, KEY<X, KEY<=X, KEY>X or KEY>=X`);
  const [, key, operator, value] = parts;
  if (RANGES[operator]) {
    const bound = value.trim() === '' ? NaN : Number(value);
    if (Number.isNaN(bound)) throw new Error(`${JSON.stringify(text)}: ${value} is not a number (KEY${operator}X takes one)`);
    return { key, range: { [RANGES[operator]]: bound } };
  }
  const values = value.split(',').filter(Boolean);
  if (!values.length) throw new Error(`${JSON.stringify(text)} needs a key and at least one value`);
  return operator === '!=' ? { key, noneOf: values } : { key, anyOf: values };
}

/**
 * ALPHA[,RESULTS] (either may be empty for the server's default) or 'default', as every lookalike command line takes
 * --query-expansion, as a findSimilar queryExpansion; an Error saying what is wrong otherwise. The server bounds
 * them (alpha 0..10, results 1..50).
 */
function parseQueryExpansion(text) {
  if (text === 'default') return {};
  const parts = text.split(',');
  const wrong = () => new Error(`${JSON.stringify(text)} is not ALPHA[,RESULTS] (e.g. 3 or 3,10) or default`);
  if (parts.length > 2) throw wrong();
  const expansion = {};
  if (parts[0] !== '') {
    expansion.alpha = Number(parts[0]);
    if (Number.isNaN(expansion.alpha)) throw wrong();
  }
  if (parts.length === 2 && parts[1] !== '') {
    if (!/^[0-9]+$/.test(parts[1])) throw wrong();
    expansion.results = Number(parts[1]);
  }
  return expansion;
}

module.exports = { ImageSimilarityClient, SERVICE_CONFIG, grpc, parseClause, parseQueryExpansion };
