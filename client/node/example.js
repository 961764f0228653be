'use strict';
// Usage: node example.js HOST:PORT [image:IMAGE_ID | product:PRODUCT_ID | IMAGE_FILE ...]
// Prints the served version and, for each query, the products most like it as JSON lines.
const fs = require('fs');
const { ImageSimilarityClient } = require('./client');

function toQuery(argument) {
  if (argument.startsWith('image:')) return { imageId: argument.slice('image:'.length) };
  if (argument.startsWith('product:')) return { productId: argument.slice('product:'.length) };
  return { image: fs.readFileSync(argument) };
}

async function main() {
  const [address, ...queries] = process.argv.slice(2);
  if (!address) {
    console.error('usage: node example.js HOST:PORT [image:IMAGE_ID | product:PRODUCT_ID | IMAGE_FILE ...]');
    process.exit(2);
  }
  const client = new ImageSimilarityClient(address);
  try {
    const info = await client.info();
    console.error(`serving ${info.version}: ${info.backbone}, ${info.productCount} products, ${info.imageCount} images`);
    for (const query of queries) {
      const response = await client.findSimilar(toQuery(query), { k: 5, excludeQuery: true });
      const matches = response.matches.map((m) => ({
        productId: m.productId, imageId: m.imageId, score: m.score, distance: m.distance, label: m.label,
      }));
      console.log(JSON.stringify({ query, indexVersion: response.indexVersion, matches }));
    }
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(`error: ${error.code ?? ''} ${error.details ?? error.message}`);
  process.exit(1);
});
