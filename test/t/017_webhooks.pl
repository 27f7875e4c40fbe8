# Webhooks: changes pushed by the API reach the tables at once; polling stays the truth.
#   1. Stripe: a change made in the fake, delivered by its signed webhook to the listener
#      (sync.webhook_listen_address), is in the table in under a second while polling is
#      an hour apart (the fake's request log proves no poll brought it);
#   2. tampered, wrongly signed, stale, replayed, oversized and malformed deliveries are
#      refused with their HTTP status, recorded in sync.webhook_deliveries / sync.webhooks,
#      and change nothing; an event older than the row is ignored;
#   3. sync.ingest_webhook() ingests one delivery (and is for the admin only);
#   4. a delivery that never arrives (held in the fake) is caught by the next poll;
#   5. a flood of deliveries and idle connections on loopback does not stop polling, and
#      the listener answers afterwards; SIGTERM stops the listener at once;
#   6. HubSpot: signed v3 deliveries (property change, deletion, creation -> poll now),
#      tampered and stale ones refused.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use Digest::SHA qw(hmac_sha256_hex hmac_sha256_base64);
use HTTP::Tiny;
use IO::Socket::INET;
use JSON::PP;
use MIME::Base64 ();
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $json = JSON::PP->new->utf8->canonical;

my $port = PostgreSQL::Test::Cluster::get_free_port();
my $listen = "127.0.0.1:$port";
my $hook = "http://$listen/webhooks";

my $S = start_fake('stripe', 'main');
my $KEY = admin($S, 'GET', 'keys')->[0]{key};
my $endpoint = admin($S, 'POST', 'webhook_endpoints', { url => "$hook/st" });
my $WHSEC = $endpoint->{secret};
like($WHSEC, qr/^whsec_/, 'the fake made a Stripe webhook endpoint with a whsec_ secret');

my $node = start_node(max_backoff => 4);
$node->append_conf('postgresql.conf',
	"sync.webhook_listen_address = '$listen'\nsync.webhook_max_body = '64kB'\n"
	  . "sync.webhook_max_connections = 32\nsync.webhook_timeout = 3\n");
$node->restart;

ok( wait_sql(30, "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'sync webhook listener'"),
	'the listener runs when sync.webhook_listen_address is set');

# A statement with a secret stays out of the server log (log_statement = all in TAP).
sub secret_sql { return $node->safe_psql('postgres', "SET log_statement = 'none';\n$_[0]"); }

secret_sql("SELECT sync.create_source('st', 'stripe', '$S->{url}', "
	  . "'{\"secret_key\": \"$KEY\", \"webhook_secret\": \"$WHSEC\"}', '{\"poll_interval\": 3600}')");
sql("SELECT sync.add_collection('st', 'customers')");
ok(sql("SELECT sync.wait_for_backfill('st', 'customers', '120 s')") eq 't', 'Stripe customers backfilled');
ok(wait_sql(60, "SELECT last_caught_up_at IS NOT NULL FROM sync.status WHERE source = 'st'"),
	'the first poll after the backfill ran; the next is an hour away');

my $ua = HTTP::Tiny->new(timeout => 30, keep_alive => 0);

sub post
{
	my ($url, $body, $headers) = @_;
	my $r = $ua->request('POST', $url, { content => $body, headers => $headers // {} });
	my $answer = eval { $json->decode($r->{content}) } // {};
	return ($r->{status}, $answer);
}

sub stripe_headers
{
	my ($body, %o) = @_;
	my $t = $o{t} // time;
	$t = int($t);
	my $sig = hmac_sha256_hex("$t.$body", $o{secret} // $WHSEC);
	return { 'Content-Type' => 'application/json', 'Stripe-Signature' => "t=$t,v1=$sig" };
}

my $evt_n = 0;

sub stripe_event
{
	my ($type, $object, $created) = @_;
	$evt_n++;
	return $json->encode(
		{
			id => sprintf('evt_test%06d', $evt_n), object => 'event', type => $type,
			created => $created // int(time), livemode => JSON::PP::false,
			data => { object => $object }
		});
}

sub customer_row
{
	my ($id) = @_;
	return row("SELECT id, name, email, extract(epoch FROM _updated_at) AS v FROM st.customers WHERE id = " . lit($id));
}

sub deliveries_count
{
	my ($where) = @_;
	return sql("SELECT coalesce(sum(repeats), 0) FROM sync.webhook_deliveries d JOIN sync.sources s ON s.id = d.source_id "
		  . "WHERE s.name = 'st' AND $where");
}

# ---------------------------------------------------------------------------
# 1. a signed change in under a second, with polling an hour apart
# ---------------------------------------------------------------------------

my @latencies;
my $t_first = time;
for my $i (1 .. 5)
{
	my $t0 = time;
	my $c = admin($S, 'POST', 'objects/customers', { name => "Hooked $i", email => "hook$i\@example.com" });
	my $seen;
	wait_until(10, sub { my $n = sql("SELECT count(*) FROM st.customers WHERE id = " . lit($c->{id})); $seen = time; $n eq '1' }, 0.01)
	  or next;
	push @latencies, $seen - $t0;
	last if @latencies >= 3 && (sort { $a <=> $b } @latencies)[0] < 0.5;
}
my ($best) = sort { $a <=> $b } @latencies;
note(sprintf('webhook latency, admin write to visible row: %s s (best %.3f s)',
	join(', ', map { sprintf('%.3f', $_) } @latencies), $best // -1));
ok(defined $best && $best < 1.0, sprintf('a signed Stripe change is in the table in %.3f s (< 1 s; best of %d tries)',
	$best // -1, scalar @latencies));
my @polls = grep { $_->{path} eq '/v1/events' && $_->{t} >= $t_first } @{ admin($S, 'GET', 'requests') };
is(scalar(@polls), 0, 'no poll of /v1/events happened meanwhile: the webhook alone brought the changes');

my $C = admin($S, 'POST', 'objects/customers', { name => 'Target', email => 'target@example.com' })->{id};
ok(wait_sql(10, "SELECT count(*) = 1 FROM st.customers WHERE id = " . lit($C), 0.05), 'created by webhook');
admin($S, 'PATCH', "objects/customers/$C", { name => 'Target renamed' });
ok(wait_sql(10, "SELECT name = 'Target renamed' FROM st.customers WHERE id = " . lit($C), 0.05),
	'an update arrives by webhook');
my $D = admin($S, 'POST', 'objects/customers', { name => 'Doomed' })->{id};
ok(wait_sql(10, "SELECT count(*) = 1 FROM st.customers WHERE id = " . lit($D), 0.05), 'created by webhook');
admin($S, 'DELETE', "objects/customers/$D");
ok(wait_sql(10, "SELECT count(*) = 0 FROM st.customers WHERE id = " . lit($D), 0.05),
	'customer.deleted arrives by webhook and deletes the row');
ok(wait_until(10, sub { !grep { $_->{status} ne '200' } @{ admin($S, 'GET', 'webhook_deliveries') } }),
	'the listener answered every delivery of the fake with 200');
my $fake_ok = grep { $_->{status} eq '200' } @{ admin($S, 'GET', 'webhook_deliveries') };
is(sql("SELECT accepted || '/' || rejected FROM sync.webhooks WHERE source = 'st'"), "$fake_ok/0",
	"sync.webhooks counts the fake's $fake_ok deliveries as accepted");

# ---------------------------------------------------------------------------
# 2. refused deliveries change nothing
# ---------------------------------------------------------------------------

my $before = customer_row($C);
my $obj = { id => $C, object => 'customer', name => 'Evil', email => 'evil@example.com', livemode => JSON::PP::false };
my $evil = stripe_event('customer.updated', $obj);

my ($st, $ans) = post("$hook/st", $evil, stripe_headers('{"tampered": true}'));
is($st, 401, 'a tampered body (signature over another body) is refused with 401');
like($ans->{reason} // '', qr/bad signature/, '... as a bad signature');

($st, $ans) = post("$hook/st", $evil, stripe_headers($evil, secret => 'whsec_wrong'));
is($st, 401, 'a signature with another secret is refused with 401');

($st, $ans) = post("$hook/st", $evil, { 'Content-Type' => 'application/json' });
is($st, 401, 'a delivery without Stripe-Signature is refused with 401');

($st, $ans) = post("$hook/st", $evil, stripe_headers($evil, t => time - 600));
is($st, 401, 'a correctly signed delivery 10 minutes old is refused with 401');
like($ans->{reason} // '', qr/stale/, '... as stale');

($st, $ans) = post("$hook/st", $evil, stripe_headers($evil, t => time + 600));
is($st, 401, 'a delivery signed 10 minutes in the future is refused with 401');

my $bad_json = '{"id": "evt_broken", "type": "customer.updated", ';
($st, $ans) = post("$hook/st", $bad_json, stripe_headers($bad_json));
is($st, 400, 'a signed but malformed body is refused with 400');

my $big = '{"pad": "' . ('x' x (100 * 1024)) . '"}';
($st, $ans) = post("$hook/st", $big, stripe_headers($big));
is($st, 413, 'a body over sync.webhook_max_body is refused with 413');

{
	# no Content-Length: a chunked body is refused as soon as it grows over the limit
	local $SIG{PIPE} = 'IGNORE';
	my $sock = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Timeout => 10) or die "connect: $!";
	print $sock "POST /webhooks/st HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
	  . "Content-Type: application/json\r\n\r\n";
	my $chunk = 'x' x 16384;
	printf $sock "%x\r\n%s\r\n", length $chunk, $chunk for 1 .. 8;
	print $sock "0\r\n\r\n";
	my $resp = '';
	while (sysread($sock, my $buf, 4096)) { $resp .= $buf; }
	like($resp, qr{^HTTP/1\.1 413}, 'a chunked body that grows over sync.webhook_max_body is refused with 413');
	close $sock;
}
($st, $ans) = post("$hook/nosuchsource", $evil, stripe_headers($evil));
is($st, 404, 'an unknown source is 404');
my $r = $ua->request('GET', "$hook/st");
is($r->{status}, 405, 'a GET is 405');

is_deeply(customer_row($C), $before, 'none of them changed the row');
is(deliveries_count("outcome = 'rejected' AND http_status = 401"), 5, 'the five 401s are recorded');
is(deliveries_count("outcome = 'rejected' AND http_status = 400"), 1, 'the 400 is recorded');
is(deliveries_count("outcome = 'rejected' AND http_status = 413"), 2, 'the 413s are recorded');
is(sql("SELECT sum(repeats) FROM sync.webhook_deliveries WHERE source_id IS NULL AND http_status = 404"), '1',
	'the unknown source is recorded');
like(sql("SELECT last_error FROM sync.webhooks WHERE source = 'st'"), qr/^HTTP 413/, 'sync.webhooks shows the last error');
unlike(sql("SELECT string_agg(coalesce(reason, ''), ' ') FROM sync.webhook_deliveries"), qr/whsec_|sk_test|Evil/,
	'no secret and no body in the recorded reasons');

# a replay: the same delivery again is acknowledged (so the API stops retrying) but not applied
my $good = stripe_event('customer.updated', { %$obj, name => 'Good', email => 'good@example.com' });
my $h = stripe_headers($good);
($st, $ans) = post("$hook/st", $good, $h);
is($st, 200, 'a valid crafted delivery is 200');
is($ans->{outcome}, 'applied', '... and applied');
is(customer_row($C)->{name}, 'Good', '... to the row');
sql("UPDATE st.customers SET name = 'changed by hand' WHERE id = " . lit($C));
($st, $ans) = post("$hook/st", $good, $h);
is($st, 200, 'the same delivery again is answered 200 (so the API stops retrying)');
is($ans->{outcome}, 'replayed', '... as a replay');
is(customer_row($C)->{name}, 'changed by hand', '... and not applied again');
is(deliveries_count("outcome = 'replayed'"), 1, 'the replay is recorded');

# an event older than the row is ignored: a webhook never moves a row backwards
my $row = customer_row($C);
my $old = stripe_event('customer.updated', { %$obj, name => 'Old news' }, int($row->{v}) - 100);
($st, $ans) = post("$hook/st", $old, stripe_headers($old));
is($st, 200, 'a valid event older than the row is answered 200');
is($ans->{outcome}, 'ignored', '... and ignored');
is(customer_row($C)->{name}, 'changed by hand', '... the row keeps its newer values');
my $old_del = stripe_event('customer.deleted', { %$obj }, int($row->{v}) - 100);
($st, $ans) = post("$hook/st", $old_del, stripe_headers($old_del));
is($ans->{outcome}, 'ignored', 'a deletion older than the row is ignored');
is(sql("SELECT count(*) FROM st.customers WHERE id = " . lit($C)), '1', '... the row stays');

# ---------------------------------------------------------------------------
# 3. sync.ingest_webhook()
# ---------------------------------------------------------------------------

my $via_sql = stripe_event('customer.updated', { %$obj, name => 'Via SQL' });
my $hdr = $json->encode(stripe_headers($via_sql));
my $res = $json->decode(secret_sql("SELECT sync.ingest_webhook('st', " . lit($hdr) . ", " . lit($via_sql) . ")"));
is_deeply([ @$res{qw(http_status outcome applied)} ], [ 200, 'applied', 1 ], 'sync.ingest_webhook applies a delivery');
is(customer_row($C)->{name}, 'Via SQL', '... to the row');
$res = $json->decode(secret_sql("SELECT sync.ingest_webhook('st', " . lit($hdr) . ", " . lit($via_sql) . ")"));
is($res->{outcome}, 'replayed', '... and recognises its replay');
my $tampered = $via_sql =~ s/Via SQL/Via SQL!/r;
$res = $json->decode(secret_sql("SELECT sync.ingest_webhook('st', " . lit($hdr) . ", " . lit($tampered) . ")"));
is_deeply([ @$res{qw(http_status outcome)} ], [ 401, 'rejected' ], '... and refuses a tampered one');
is(sql("SELECT count(*) FROM sync.webhook_deliveries WHERE via = 'sql'"), '3', 'its deliveries are recorded');
sql("CREATE ROLE someone LOGIN");
my ($ret, $out, $err) = $node->psql('postgres',
	"SELECT sync.ingest_webhook('st', '{}', '{}')", extra_params => [ '-U', 'someone' ]);
like($err, qr/permission denied/, 'a role without admin rights may not call sync.ingest_webhook');
is(sql("SET ROLE someone; SELECT count(*) > 0 FROM sync.webhooks"), 't', 'sync.webhooks is readable by everyone');
($ret, $out, $err) = $node->psql('postgres', "SELECT count(*) FROM sync.webhook_deliveries",
	extra_params => [ '-U', 'someone' ]);
like($err, qr/permission denied/, 'sync.webhook_deliveries is not');

# a user's lock on the table: the delivery fails (503, the API retries), nothing of it is kept
my $locker = $node->background_psql('postgres', on_error_stop => 1);
$locker->query_safe('BEGIN; LOCK TABLE st.customers IN ACCESS EXCLUSIVE MODE');
my $locked = stripe_event('customer.updated', { %$obj, name => 'Behind a lock' });
($st, $ans) = post("$hook/st", $locked, stripe_headers($locked));
is($st, 503, 'a delivery for a table a user holds locked is answered 503 after sync.lock_timeout');
$locker->query_safe('COMMIT');
$locker->quit;
is(deliveries_count("outcome = 'failed' AND http_status = 503"), 1, '... recorded as failed');
like(sql("SELECT last_error FROM sync.webhooks WHERE source = 'st'"), qr/^HTTP 503: .*SQLSTATE 55P03/,
	'... sync.webhooks shows its SQLSTATE (the message, which may quote data, stays in the server log)');
($st, $ans) = post("$hook/st", $locked, stripe_headers($locked));
is_deeply([ $st, $ans->{outcome} ], [ 200, 'applied' ], 'the API\'s retry after the lock is applied (no event id was kept)');
is(customer_row($C)->{name}, 'Behind a lock', '... to the row');

# ---------------------------------------------------------------------------
# 4. a delivery that never arrives is caught by the next poll
# ---------------------------------------------------------------------------

admin($S, 'POST', 'webhooks/hold', { hold => JSON::PP::true });
my $H = admin($S, 'POST', 'objects/customers', { name => 'Never delivered' })->{id};
sleep 2;
is(sql("SELECT count(*) FROM st.customers WHERE id = " . lit($H)), '0', 'a held delivery does not arrive');
sql(q{SELECT sync.alter_source('st', options => '{"poll_interval": 2}')});
ok(wait_sql(60, "SELECT count(*) = 1 FROM st.customers WHERE id = " . lit($H)), 'the next poll brings it');
my $t_poll = time;
my $H2 = admin($S, 'POST', 'objects/customers', { name => 'Also never delivered' })->{id};
ok(wait_sql(60, "SELECT count(*) = 1 FROM st.customers WHERE id = " . lit($H2)),
	sprintf('a second held change comes with the regular polling (%.1f s, poll_interval 2 s)', time - $t_poll));
ok((grep { $_->{event_id} && $_->{status} eq 'dropped' } @{ admin($S, 'GET', 'webhook_deliveries') }) >= 2,
	'the fake dropped those deliveries');
admin($S, 'POST', 'webhooks/hold', { hold => JSON::PP::false });

# ---------------------------------------------------------------------------
# 6. HubSpot: X-HubSpot-Signature-v3
# ---------------------------------------------------------------------------

my $HS_SECRET = 'hs-app-client-secret';
# search lag 0: a creation makes the collection poll at once, and HubSpot's own search lag would
# hide the new record from that poll (it then comes with the next one, an hour away here)
my $HF = start_fake('hubspot', 'h', { timeout => 120 }, '--contacts', 20, '--companies', 3, '--deals', 3,
	'--cars', 1, '--archived', 0, '--search-lag', 0, '--client-secret', $HS_SECRET);
my $PAT = 'pat-na1-11111111-2222-3333-4444-555555555555';
secret_sql("SELECT sync.create_source('hs', 'hubspot', '$HF->{url}', "
	  . "'{\"access_token\": \"$PAT\", \"client_secret\": \"$HS_SECRET\"}', '{\"poll_interval\": 3600}')");
sql("SELECT sync.add_collection('hs', 'contacts')");
ok(sql("SELECT sync.wait_for_backfill('hs', 'contacts', '120 s')") eq 't', 'HubSpot contacts backfilled');
ok(wait_sql(60, "SELECT last_caught_up_at IS NOT NULL FROM sync.status WHERE source = 'hs'"),
	'HubSpot: the first poll ran; the next is an hour away');
admin($HF, 'POST', 'webhook_target', { url => "$hook/hs", client_secret => $HS_SECRET });

my $hs_contact = admin($HF, 'GET', 'records/contacts')->[0];
my $HC = $hs_contact->{id};
my $t_hs = time;
admin($HF, 'PATCH', "records/contacts/$HC", { properties => { firstname => 'Pushed', email => 'pushed@example.com' } });
ok(wait_sql(10, "SELECT firstname = 'Pushed' AND email = 'pushed\@example.com' FROM hs.contacts WHERE id = $HC", 0.02),
	sprintf('a HubSpot property change arrives by webhook (%.3f s)', time - $t_hs));
is(sql("SELECT lastmodifieddate = " . lit(admin($HF, 'GET', "records/contacts/$HC")->{properties}{lastmodifieddate})
	  . "::timestamptz FROM hs.contacts WHERE id = $HC"), 't', '... with the new lastmodifieddate');

my $t_create = time;
my $NEW = admin($HF, 'POST', 'records/contacts', { properties => { firstname => 'Created', email => 'created@example.com' } })->{id};
ok(wait_sql(20, "SELECT firstname = 'Created' FROM hs.contacts WHERE id = $NEW", 0.05),
	sprintf('a contact.creation makes the collection poll at once (%.2f s)', time - $t_create));

admin($HF, 'DELETE', "records/contacts/$NEW");
ok(wait_sql(10, "SELECT count(*) = 0 FROM hs.contacts WHERE id = $NEW", 0.05), 'a contact.deletion deletes the row');
my @hs_polls = grep { $_->{path} =~ m{/search$} && $_->{t} >= $t_hs } @{ admin($HF, 'GET', 'requests') };
ok(@hs_polls <= 2, 'only the creation asked for a poll (' . scalar(@hs_polls) . ' searches)');
ok(wait_until(10, sub { !grep { $_->{status} ne '200' } @{ admin($HF, 'GET', 'webhook_deliveries') } }),
	'the listener answered every HubSpot delivery with 200');

sub hs_post
{
	my ($events, %o) = @_;
	my $body = ref $events ? $json->encode($events) : $events;
	my $ts = $o{ts} // int(time * 1000);
	my $uri = $o{uri} // "$hook/hs";
	my $sig = hmac_sha256_base64('POST' . $uri . ($o{signed_body} // $body) . $ts, $o{secret} // $HS_SECRET);
	$sig .= '=' while length($sig) % 4;
	return post("$hook/hs", $body,
		{ 'Content-Type' => 'application/json', 'X-HubSpot-Signature-v3' => $sig, 'X-HubSpot-Request-Timestamp' => $ts });
}

my $hs_ms = int(1000 * sql("SELECT extract(epoch FROM lastmodifieddate) FROM hs.contacts WHERE id = $HC"));
my $hs_n = 900000;
sub hs_event
{
	my (%e) = @_;
	return { eventId => ++$hs_n, subscriptionId => 7, portalId => 62515, appId => 54321, attemptNumber => 0,
		objectId => $HC + 0, changeSource => 'CRM', subscriptionType => 'contact.propertyChange', %e };
}
my $ev = [ hs_event(occurredAt => $hs_ms + 1000, propertyName => 'firstname', propertyValue => 'Crafted') ];
($st, $ans) = hs_post($ev, signed_body => '[]');
is($st, 401, 'HubSpot: a tampered body is refused with 401');
($st, $ans) = hs_post($ev, secret => 'another secret');
is($st, 401, 'HubSpot: another secret is refused with 401');
($st, $ans) = hs_post($ev, ts => int(time * 1000) - 6 * 60 * 1000);
is($st, 401, 'HubSpot: a timestamp 6 minutes old is refused with 401');
like($ans->{reason} // '', qr/stale/, '... as stale');
($st, $ans) = hs_post('[{"eventId": 1}');
is($st, 400, 'HubSpot: a malformed body is refused with 400');
is(sql("SELECT firstname FROM hs.contacts WHERE id = $HC"), 'Pushed', '... none changed the row');
($st, $ans) = hs_post($ev);
is_deeply([ $st, $ans->{outcome} ], [ 200, 'applied' ], 'HubSpot: a correctly signed crafted event is applied');
is(sql("SELECT firstname FROM hs.contacts WHERE id = $HC"), 'Crafted', '... to the row');
sql("UPDATE hs.contacts SET firstname = 'by hand' WHERE id = $HC");
($st, $ans) = hs_post($ev);
is_deeply([ $st, $ans->{outcome} ], [ 200, 'replayed' ], 'HubSpot: its replay is acknowledged as a replay');
is(sql("SELECT firstname FROM hs.contacts WHERE id = $HC"), 'by hand', '... and not applied');
($st, $ans) = hs_post([ hs_event(occurredAt => $hs_ms - 60000, propertyName => 'firstname', propertyValue => 'Stale') ]);
is_deeply([ $st, $ans->{outcome} ], [ 200, 'ignored' ], 'HubSpot: a change older than the row is ignored');
($st, $ans) = hs_post([ hs_event(occurredAt => $hs_ms - 60000, subscriptionType => 'contact.deletion') ]);
is($ans->{outcome}, 'ignored', 'HubSpot: a deletion older than the row is ignored');
is(sql("SELECT firstname FROM hs.contacts WHERE id = $HC"), 'by hand', '... the row stays as it was');
my $mixed = [ hs_event(occurredAt => $hs_ms + 2000, propertyName => 'lastname', propertyValue => 'Mixed'), $ev->[0] ];
($st, $ans) = hs_post($mixed);
is_deeply([ $ans->{outcome}, $ans->{applied}, $ans->{replayed} ], [ 'applied', 1, 1 ],
	'HubSpot: of a batch with one event seen before, only the new one is applied');
is(sql("SELECT firstname || ' ' || lastname FROM hs.contacts WHERE id = $HC"), 'by hand Mixed', '... to the row');

admin($HF, 'POST', 'webhooks/hold', { hold => JSON::PP::true });
admin($HF, 'PATCH', "records/contacts/$HC", { properties => { firstname => 'Held back' } });
sleep 2;
is(sql("SELECT firstname FROM hs.contacts WHERE id = $HC"), 'by hand', 'HubSpot: a held delivery does not arrive');
sql("SELECT sync.run_now('hs', 'contacts')");
ok(wait_sql(60, "SELECT firstname = 'Held back' FROM hs.contacts WHERE id = $HC"), '... the next poll brings it');
admin($HF, 'POST', 'webhooks/hold', { hold => JSON::PP::false });

# ---------------------------------------------------------------------------
# 7. Airtable: a webhook per table, pings with X-Airtable-Content-MAC, payloads for deletes
# ---------------------------------------------------------------------------

# webhooks live a day and 20 s here: 20 s after its creation one is within a day of expiring
my $AF = start_fake('airtable', 'at', '--rate-limit', 0, '--token-rate-limit', 0, '--tables', 1, '--records', 30,
	'--webhook-ttl', 86400 + 20);
my $at_admin = admin($AF, 'GET', '');
my $base = $at_admin->{bases}[0];
my $at_table = admin($AF, 'GET', "schema/$base")->{tables}[0];
my $rec_path = "records/$base/$at_table->{id}";
secret_sql("SELECT sync.create_source('at', 'airtable', '$AF->{url}', '{\"access_token\": \"$at_admin->{pat}\"}', "
	  . "'{\"base_id\": \"$base\", \"poll_interval\": 3600, \"sweep_interval\": 3600, "
	  . "\"webhook_notification_url\": \"$hook/at\"}')");
sql("SELECT sync.add_collection('at', " . lit($at_table->{name}) . ")");
my $at_rel = sql("SELECT target_table FROM sync.status WHERE source = 'at'");
ok(sql("SELECT sync.wait_for_backfill('at', " . lit($at_table->{name}) . ", '120 s')") eq 't', 'Airtable table backfilled');
ok(wait_until(60, sub { my $c = cursor_of('at', $at_table->{name}); $c->{hook} && $c->{hook}{id} && !$c->{hook_turn} }),
	'sync made a webhook for the table and read its payloads');
my $at_hooks = admin($AF, 'GET', 'webhooks');
is(scalar(@$at_hooks), 1, 'the base has one webhook');
is($at_hooks->[0]{notificationUrl}, "$hook/at", '... notifying the listener');
is(sql("SELECT count(*) FROM sync.webhook_secrets w JOIN sync.sources s ON s.id = w.source_id WHERE s.name = 'at'"),
	'1', 'its macSecretBase64 is kept in sync.webhook_secrets');
unlike(sql("SELECT cursor::text FROM sync.collection_state"), qr/\Q$at_hooks->[0]{macSecretBase64}\E/,
	'... and not in the readable cursor');
ok(wait_sql(60, "SELECT last_caught_up_at IS NOT NULL AND activity = 'polling for changes' FROM sync.status WHERE source = 'at'"),
	'Airtable: the poll ran; the next is an hour away, and so is the next sweep');

my $victim = admin($AF, 'GET', $rec_path)->[0]{id};
ok(sql("SELECT count(*) FROM $at_rel WHERE id = " . lit($victim)) eq '1', 'a record to delete is in the table');
my $t_del = time;
admin($AF, 'DELETE', "$rec_path/$victim");
ok(wait_sql(20, "SELECT count(*) = 0 FROM $at_rel WHERE id = " . lit($victim), 0.05),
	sprintf('an Airtable delete arrives through the ping and the payloads (%.2f s, sweeps an hour apart)', time - $t_del));
my $t_new = time;
my $born = admin($AF, 'POST', $rec_path, { fields => { Name => 'Pinged in' } })->{id};
ok(wait_sql(20, "SELECT count(*) = 1 FROM $at_rel WHERE id = " . lit($born), 0.05),
	sprintf('an Airtable create comes with the poll the ping asks for (%.2f s)', time - $t_new));
ok(wait_until(10, sub { !grep { $_->{status} ne '200' } @{ admin($AF, 'GET', 'webhook_deliveries') } }),
	'the listener answered every Airtable ping with 200');

my $ping = '{"base":{"id":"' . $base . '"},"webhook":{"id":"' . $at_hooks->[0]{id} . '"},"timestamp":"2030-01-01T00:00:00.000Z"}';
($st, $ans) = post("$hook/at", $ping, { 'X-Airtable-Content-MAC' => 'hmac-sha256=' . ('0' x 64) });
is($st, 401, 'Airtable: a ping with a wrong MAC is refused with 401');
($st, $ans) = post("$hook/at", $ping, {});
is($st, 401, 'Airtable: a ping without a MAC is refused with 401');
my $mac = 'hmac-sha256=' . hmac_sha256_hex($ping, MIME::Base64::decode_base64($at_hooks->[0]{macSecretBase64}));
($st, $ans) = post("$hook/at", $ping, { 'X-Airtable-Content-MAC' => $mac });
is_deeply([ $st, $ans->{outcome} ], [ 200, 'applied' ], 'Airtable: a ping with the right MAC is applied (a poll asked for)');
($st, $ans) = post("$hook/at", $ping, { 'X-Airtable-Content-MAC' => $mac });
is($ans->{outcome}, 'replayed', 'Airtable: the same ping again is a replay');

# the webhook expires in less than a day by now: the next step refreshes it
my $expires = cursor_of('at', $at_table->{name})->{hook}{expires};
sleep 1 while time - $t_del < 21;
sql("SELECT sync.run_now('at')");
ok(wait_until(60, sub { (cursor_of('at', $at_table->{name})->{hook}{expires} // 0) > $expires + 10 }),
	'a webhook within a day of expiring is refreshed');
ok((grep { $_->{method} eq 'POST' && $_->{path} =~ m{/webhooks/[^/]+/refresh$} } @{ admin($AF, 'GET', 'requests') }) >= 1,
	'... with POST .../refresh');

# ---------------------------------------------------------------------------
# 5. a flood on loopback does not stop polling; SIGTERM
# ---------------------------------------------------------------------------

my $flood_py = <<'PY';
import socket, sys, threading, time, http.client
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = time.time() + seconds
counts = {"sent": 0, "answered": 0, "refused": 0}
lock = threading.Lock()
def idle():
    # connections that say nothing, or half a request, and hold their slot
    while time.time() < stop:
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"POST /webhooks/st HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(min(5, max(0, stop - time.time())))
            s.close()
        except OSError:
            time.sleep(0.05)
def blast():
    body = b'{"id": "evt_flood", "type": "customer.updated"}'
    while time.time() < stop:
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            for _ in range(50):
                c.request("POST", "/webhooks/st", body, {"Stripe-Signature": "t=1,v1=00"})
                c.getresponse().read()
                with lock: counts["answered"] += 1
            c.close()
        except (OSError, http.client.HTTPException):
            with lock: counts["refused"] += 1
            time.sleep(0.01)
threads = [threading.Thread(target=idle) for _ in range(10)] + [threading.Thread(target=blast) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("answered=%d refused=%d" % (counts["answered"], counts["refused"]))
PY
my $flood_file = "$PostgreSQL::Test::Utils::tmp_check/flood.py";
open(my $fh, '>', $flood_file) or die;
print $fh $flood_py;
close $fh;
admin($S, 'POST', 'webhooks/hold', { hold => JSON::PP::true });
my $flood_out = '';
my $flood = IPC::Run::start([ '/usr/bin/python3', $flood_file, '127.0.0.1', $port, 20 ], '>', \$flood_out, '2>', \$flood_out);
sleep 3;
my $t_flood = time;
my $F = admin($S, 'POST', 'objects/customers', { name => 'Made during the flood' })->{id};
ok(wait_sql(60, "SELECT count(*) = 1 FROM st.customers WHERE id = " . lit($F)),
	sprintf('a change made during the flood is polled in (%.1f s)', time - $t_flood));
$flood->finish;
note("flood: $flood_out");
my ($answered) = $flood_out =~ /answered=(\d+)/;
ok(($answered // 0) > 200, "the listener kept answering during the flood ($flood_out)");
my $flood_rows = sql("SELECT count(*) || ' rows for ' || sum(repeats) FROM sync.webhook_deliveries "
	  . "WHERE reason LIKE 'bad signature%' OR reason LIKE 'stale%'");
note("refusals recorded: $flood_rows");
my ($rows, $refusals) = $flood_rows =~ /^(\d+) rows for (\d+)/;
ok($refusals >= $answered && $rows < 20, "the flood's refusals are counted, not stored one by one ($flood_rows)");
admin($S, 'POST', 'webhooks/hold', { hold => JSON::PP::false });
my $after = stripe_event('customer.updated', { %$obj, name => 'After the flood' });
ok( wait_until(30, sub { (post("$hook/st", $after, stripe_headers($after)))[0] == 200 }),
	'the listener answers after the flood');
is(customer_row($C)->{name}, 'After the flood', '... and applies');

my $lpid = sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'sync webhook listener'");
my $t_kill = time;
kill 'TERM', $lpid;
ok(wait_until(10, sub { !kill(0, $lpid) }, 0.02), sprintf('SIGTERM stops the listener in %.2f s', time - $t_kill));
ok(time - $t_kill < 2, 'promptly (< 2 s)');
ok(wait_until(60, sub { (post("$hook/st", $after, stripe_headers($after)))[0] == 200 }),
	'the postmaster restarts the listener, which answers again');

# DROP DATABASE of the listener's database is not blocked by its connection
sql('CREATE DATABASE scratch');
$node->append_conf('postgresql.conf', "sync.webhook_database = 'scratch'\n");
$node->restart;
ok( wait_sql(30, "SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'sync webhook listener' "
		  . "AND datname = 'scratch'"),
	'the listener serves the database sync.webhook_database names');
($st, $ans) = post("$hook/st", $after, stripe_headers($after));
is($st, 503, 'a database without the extension: deliveries are answered 503');
my $t_drop = time;
my ($drop_ret, $drop_out, $drop_err) = $node->psql('postgres', 'DROP DATABASE scratch');
is($drop_ret, 0, sprintf('DROP DATABASE of the listener\'s database succeeds (%.1f s)', time - $t_drop)) or diag($drop_err);
ok(time - $t_drop < 5, '... without waiting out the 5 s DROP DATABASE gives other sessions');

done_testing();
