'use strict';
// Usage: node example.js HOST:PORT [--filter KEY=V1,V2 | KEY!=V1,V2 | 'KEY<X' | 'KEY>=X' ...] [--diversity D [--candidates N]]
//          [--region X_MIN,Y_MIN,X_MAX,Y_MAX (the part of each IMAGE_FILE to search with)]
//          [--query-expansion ALPHA[,RESULTS] (each IMAGE_FILE averaged with its first results, searched again)]
//          [--strategy average_vector|best_score|sum_scores] [--negative PRODUCT_ID,PRODUCT_ID] (for recommend:)
//          [--root-ca CA.pem [--client-cert CERT.pem --client-key KEY.pem]]
//          [image:IMAGE_ID | product:PRODUCT_ID | recommend:PRODUCT_ID,PRODUCT_ID | embed:IMAGE_FILE | IMAGE_FILE ...]
// Prints the served version and, for each query, the products most like it as JSON lines (embed: the
// image's vector, of its --region, as {query, modelVersion, vectors}); every query obeys the filters
// (clauses AND together). The query's own product is left out or kept as the server
// decides (out for image: and product:, kept for a photo). --root-ca turns on TLS, the client pair mTLS.
const fs = require('fs');
const {
  ImageSimilarityClient, grpc, parseClause, parseQueryExpansion,
} = require('./client');

const USAGE = 'usage: node example.js HOST:PORT [--filter KEY=V1,V2|KEY!=V1,V2|KEY<X|KEY<=X|KEY>X|KEY>=X ...] '
  + '[--diversity D [--candidates N]] '
  + '[--region X_MIN,Y_MIN,X_MAX,Y_MAX] [--query-expansion ALPHA[,RESULTS]] '
  + '[--strategy average_vector|best_score|sum_scores] [--negative ID,ID] '
  + '[--root-ca CA.pem [--client-cert CERT.pem --client-key KEY.pem]] '
  + '[image:IMAGE_ID | product:PRODUCT_ID | recommend:ID,ID | embed:IMAGE_FILE | IMAGE_FILE ...]';
const TLS_FLAGS = { '--root-ca': 'rootCa', '--client-cert': 'clientCert', '--client-key': 'clientKey' };

function toRegion(text) {
  const values = text.split(',').map(Number);
  if (values.length !== 4 || values.some(Number.isNaN)) throw new Error(`--region ${text}: not X_MIN,Y_MIN,X_MAX,Y_MAX`);
  const [xMin, yMin, xMax, yMax] = values;
  return { xMin, yMin, xMax, yMax };
}

function toQuery(argument) {
  if (argument.startsWith('image:')) return { imageId: argument.slice('image:'.length) };
  if (argument.startsWith('product:')) return { productId: argument.slice('product:'.length) };
  return { image: fs.readFileSync(argument) };
}

const products = (ids) => ids.split(',').filter((id) => id !== '').map((productId) => ({ productId }));

async function answer(client, query, { negative = '', strategy, ...options }) {
  if (query.startsWith('recommend:')) {
    return client.recommend(products(query.slice('recommend:'.length)), products(negative),
      strategy ? { ...options, strategy } : options);
  }
  return client.findSimilar(toQuery(query), options);
}

async function main() {
  const [address, ...rest] = process.argv.slice(2);
  const clauses = [];
  const queries = [];
  const tls = {};
  const ranking = {};
  let region;
  for (let i = 0; i < rest.length; i += 1) {
    if (rest[i] === '--filter') clauses.push(parseClause(rest[(i += 1)] ?? ''));
    else if (rest[i] === '--diversity') ranking.diversity = Number(rest[(i += 1)]);
    else if (rest[i] === '--candidates') ranking.candidates = Number(rest[(i += 1)]);
    else if (rest[i] === '--region') region = toRegion(rest[(i += 1)] ?? '');
    else if (rest[i] === '--query-expansion') ranking.queryExpansion = parseQueryExpansion(rest[(i += 1)] ?? '');
    else if (rest[i] === '--strategy') ranking.strategy = rest[(i += 1)];
    else if (rest[i] === '--negative') ranking.negative = rest[(i += 1)] ?? '';
    else if (TLS_FLAGS[rest[i]]) tls[TLS_FLAGS[rest[i]]] = rest[(i += 1)];
    else queries.push(rest[i]);
  }
  if (!address) {
    console.error(USAGE);
    process.exit(2);
  }
  const client = new ImageSimilarityClient(address, tls);
  try {
    const info = await client.info();
    console.error(`serving ${info.version}: ${info.backbone}, ${info.productCount} products, ${info.imageCount} images`);
    const options = { k: 5, withAttributes: clauses.length > 0, filter: { clauses }, ...ranking };
    for (const query of queries) {
      if (query.startsWith('embed:')) {
        const image = fs.readFileSync(query.slice('embed:'.length));
        const { vectors, modelVersion } = await client.embed([image], region ? [region] : []);
        console.log(JSON.stringify({ query, modelVersion, vectors }));
        continue;
      }
      const response = await answer(client, query, region ? { ...options, region } : options);
      const matches = response.matches.map((m) => ({
        productId: m.productId, imageId: m.imageId, score: m.score, distance: m.distance, label: m.label,
        attributes: m.attributes,
      }));
      console.log(JSON.stringify({ query, indexVersion: response.indexVersion, matches }));
    }
  } finally {
    client.close();
  }
}

main().catch((error) => {
  // The status code by its name (UNAVAILABLE, NOT_FOUND, ...), as the other clients print it.
  const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code);
  console.error(`error: ${code ?? ''}: ${error.details ?? error.message}`);
  process.exit(1);
});
