'use strict';
// Usage: node example.js HOST:PORT [ITEM_ID | IMAGE_FILE ...]
// Prints the served version and, for each query, its neighbours as JSON lines.
const fs = require('fs');
const { ImageSimilarityClient } = require('./client');

async function main() {
  const [address, ...queries] = process.argv.slice(2);
  if (!address) {
    console.error('usage: node example.js HOST:PORT [ITEM_ID | IMAGE_FILE ...]');
    process.exit(2);
  }
  const client = new ImageSimilarityClient(address);
  try {
    const info = await client.info();
    console.error(`serving ${info.version}: ${info.backbone}, ${info.itemCount} items`);
    for (const query of queries) {
      const isFile = fs.existsSync(query);
      const response = await client.findSimilar(isFile ? { image: fs.readFileSync(query) } : { itemId: query },
        { k: 5, excludeQuery: true });
      const matches = response.matches.map((m) => ({ itemId: m.itemId, distance: m.distance, label: m.label }));
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
