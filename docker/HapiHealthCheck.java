import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

/**
 * A container health check for images without a shell or curl: exit 0 when a GET of the URL
 * (the first argument) answers 200 within 5 seconds, 1 otherwise.
 */
public final class HapiHealthCheck {
	public static void main(String[] args) {
		if (args.length != 1) {
			System.err.println("usage: HapiHealthCheck URL");
			System.exit(2);
		}
		try {
			HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
			HttpRequest request = HttpRequest.newBuilder(URI.create(args[0]))
					.timeout(Duration.ofSeconds(5))
					.GET()
					.build();
			int status = client.send(request, HttpResponse.BodyHandlers.discarding()).statusCode();
			if (status != 200) {
				System.err.println("HTTP " + status + " from " + args[0]);
				System.exit(1);
			}
		} catch (Exception e) {
			System.err.println(e.getClass().getSimpleName() + " reaching " + args[0]);
			System.exit(1);
		}
		System.exit(0);
	}
}
