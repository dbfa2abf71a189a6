// A stock Hocuspocus 4 server for benches/peers/run.sh: default settings, no extensions (so no
// persistence), on HOST:PORT (loopback). Stops cleanly on SIGINT/SIGTERM (the server's default).
import { Server } from "@hocuspocus/server";

const host = process.env.HOST ?? "127.0.0.1";
const port = Number(process.env.PORT ?? "1234");

const server = new Server({ address: host, port, quiet: true });
await server.listen();
console.log(`hocuspocus listening on ${host}:${port}`);
