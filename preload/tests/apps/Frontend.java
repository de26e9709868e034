// A header-blind JVM frontend: com.sun.net.httpserver with a 16-thread executor; each inbound
// GET /req/<id> makes two outbound calls, GET /call/<id>/<n>, with HttpURLConnection (whose
// keep-alive cache hands connections from thread to thread), with small random pauses.
// usage: java Frontend.java BACKEND_PORT [PROXY_PORT LISTEN_PORT]
//   PROXY_PORT: calls go through the forward proxy at 127.0.0.1:PROXY_PORT, and the app listens
//   on LISTEN_PORT.
import com.sun.net.httpserver.HttpServer;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.HttpURLConnection;
import java.net.InetSocketAddress;
import java.net.Proxy;
import java.net.URL;
import java.util.concurrent.Executors;
import java.util.concurrent.ThreadLocalRandom;

public class Frontend {
    public static void main(String[] args) throws Exception {
        int backend = Integer.parseInt(args[0]);
        Proxy proxy = args.length > 1
            ? new Proxy(Proxy.Type.HTTP, new InetSocketAddress("127.0.0.1", Integer.parseInt(args[1])))
            : Proxy.NO_PROXY;
        int listen = args.length > 2 ? Integer.parseInt(args[2]) : 0;
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", listen), 64);
        server.setExecutor(Executors.newFixedThreadPool(16));
        server.createContext("/", exchange -> {
            String path = exchange.getRequestURI().getPath();
            String id = path.substring(path.lastIndexOf('/') + 1);
            try {
                for (int n = 0; n < 2; n++) {
                    Thread.sleep(ThreadLocalRandom.current().nextInt(4));
                    URL url = new URL("http://127.0.0.1:" + backend + "/call/" + id + "/" + n);
                    HttpURLConnection c = (HttpURLConnection) url.openConnection(proxy);
                    try (InputStream in = c.getInputStream()) {
                        in.readAllBytes();
                    }
                }
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            byte[] body = "ok".getBytes();
            exchange.sendResponseHeaders(200, body.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(body);
            }
        });
        server.start();
        System.out.println(server.getAddress().getPort());
        System.out.flush();
    }
}
