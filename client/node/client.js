'use strict';
// A Node.js client for lookalike.v1.ImageSimilarity, loaded at run time from the repository's protos/.
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

class ImageSimilarityClient {
  /**
   * @param {string} address host:port
   * @param {{timeoutMs?: number, credentials?: grpc.ChannelCredentials}} [options]
   */
  constructor(address, options = {}) {
    this.timeoutMs = options.timeoutMs ?? 10000;
    this.stub = new lookalike.ImageSimilarity(address, options.credentials ?? grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
      'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
    });
  }

  _call(method, request) {
    const deadline = new Date(Date.now() + this.timeoutMs);
    return new Promise((resolve, reject) => {
      this.stub[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
    });
  }

  /** @param {Buffer[]} images encoded images */
  async embed(images) {
    const response = await this._call('Embed', { images });
    return { vectors: response.vectors.map((v) => v.values), modelVersion: response.modelVersion };
  }

  /** @param {{image?: Buffer, itemId?: string, vector?: number[]}} query */
  async findSimilar(query, { k = 10, excludeQuery = true, searchK = 0 } = {}) {
    const request = { k, excludeQuery, searchK };
    if (query.image) request.image = query.image;
    else if (query.itemId) request.itemId = query.itemId;
    else if (query.vector) request.vector = { values: query.vector };
    else throw new Error('findSimilar needs one of image, itemId or vector');
    return this._call('FindSimilar', request);
  }

  async info() {
    return this._call('GetInfo', {});
  }

  close() {
    this.stub.close();
  }
}

module.exports = { ImageSimilarityClient, grpc };
