import java.util.List;

import ch.qos.logback.classic.Level;
import ch.qos.logback.classic.Logger;
import com.datastax.driver.core.Cluster;
import com.datastax.driver.core.ColumnDefinitions;
import com.datastax.driver.core.QueryOptions;
import com.datastax.driver.core.ResultSet;
import com.datastax.driver.core.Row;
import com.datastax.driver.core.Session;
import com.datastax.driver.core.SocketOptions;
import org.slf4j.LoggerFactory;

/**
 * A tiny CQL client for e2e/scripts/cassandra.sh, compiled at install time
 * against the jars Maven fetched (cassandra-all depends on the DataStax 3.x
 * driver, so no extra download and no Python are needed).
 *
 * Usage: CqlCheck HOST PORT [STATEMENT...]
 *   no statement: runs "SELECT release_version FROM system.local" and prints
 *   the version, i.e. proves a real CQL round trip works.
 *   statements: runs each in order and prints result rows as
 *   "col=value | col=value".
 * Exits 0 on success, 1 on any error (message on stderr).
 */
public final class CqlCheck {
    public static void main(String[] args) {
        // The driver logs through slf4j -> logback; without a config file
        // logback prints DEBUG to the console. Only errors are wanted here.
        ((Logger) LoggerFactory.getLogger(org.slf4j.Logger.ROOT_LOGGER_NAME)).setLevel(Level.ERROR);

        if (args.length < 2) {
            System.err.println("usage: CqlCheck HOST PORT [STATEMENT...]");
            System.exit(2);
        }
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        List<String> statements = args.length > 2
                ? List.of(args).subList(2, args.length)
                : List.of("SELECT release_version FROM system.local");

        Cluster cluster = Cluster.builder()
                .addContactPoint(host)
                .withPort(port)
                .withoutMetrics()
                .withoutJMXReporting()
                // Fail fast on the health check (the caller loops with its own
                // deadline); give real statements, DDL included, more time.
                .withSocketOptions(new SocketOptions()
                        .setConnectTimeoutMillis(2000)
                        .setReadTimeoutMillis(args.length > 2 ? 20000 : 5000))
                // No schema/token metadata: this 3.x driver predates some
                // Cassandra 5 schema features and we do not need them.
                .withQueryOptions(new QueryOptions().setMetadataEnabled(false))
                .build();
        int rc = 0;
        try (Session session = cluster.connect()) {
            for (String cql : statements) {
                ResultSet rs = session.execute(cql);
                ColumnDefinitions defs = rs.getColumnDefinitions();
                for (Row row : rs) {
                    StringBuilder line = new StringBuilder();
                    for (int i = 0; i < defs.size(); i++) {
                        if (i > 0) line.append(" | ");
                        if (args.length > 2) line.append(defs.getName(i)).append('=');
                        line.append(row.getObject(i));
                    }
                    System.out.println(line);
                }
            }
        } catch (Exception e) {
            System.err.println("cql: " + e);
            rc = 1;
        }
        // Not cluster.close(): that waits out Netty's 2 s graceful-shutdown
        // quiet period. Nothing is left to flush, so just exit.
        cluster.closeAsync();
        System.exit(rc);
    }
}
