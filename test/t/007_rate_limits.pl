# Budgets, rate limits, lag and statistics (sync.budgets, sync.stat_*), against the strict fakes:
#   1. window test: a Salesforce backfill at requests_per_second 5, burst 1: no sliding one-second
#      window of the fake's request log holds more than floor(burst + rate) requests, and the
#      achieved rate is at least 95% of the budget; sync.budgets shows the budget;
#   2. the budget changes while the backfill runs (alter_source to 10/s);
#   3. fair share: a change to a small collection shows up within est_max_lag + 2 s while a big
#      backfill of another collection of the same source runs;
#   4. default budget: 30% of the org's daily allocation spread over the day (Sforce-Limit-Info),
#      then quota_fraction 0.5; invalid quota_fraction values fail with 22023;
#   5. daily allocation nearly spent (slower, limited_by, waiting_on), then spent (403
#      REQUEST_LIMIT_EXCEEDED: 'rate limited', a 300 s penalty that holds although the allocation
#      was raised, until sync.run_now lifts it);
#      a REQUEST_LIMIT_EXCEEDED with Retry-After mid-backfill loses no page;
#   6. Airtable's 30-second penalty: no request to the base for 30 s after a 429, no page lost,
#      another base keeps syncing meanwhile;
#   7. Stripe: Retry-After: 3 is honoured; without it the source waits at least 1 s;
#   8. HubSpot usage headers: daily limit and 10-second burst limit shape the budget;
#   9. statistics: sync.stat_collections / stat_sources equal the fake's own request log
#      exactly, records_upserted the rows written, errors and retries count injected 503s;
#      sync.reset_stats; PUBLIC can read the views but not reset them.
# Every timing figure comes from the fakes' request logs (arrival time of each request).
use strict;
use warnings;

use Encode qw(encode_utf8);
use FindBin;
use lib $FindBin::Bin;
use JSON::PP;
use POSIX qw(floor);
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time usleep);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $sf_creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $HS_PAT = 'pat-na1-11111111-2222-3333-4444-555555555555';    # the fake's --private-app-token default
my $node;    # set up below; start_fake, admin, sql, wait_sql, row, status_of etc. are in SyncTest.pm

# ---------------------------------------------------------------------------
# Helpers: the fakes' request logs
# ---------------------------------------------------------------------------

# The fake's request log in arrival order.
sub fake_log
{
	my ($fake) = @_;
	return [ sort { $a->{t} <=> $b->{t} } @{ admin($fake, 'GET', 'requests') } ];
}

sub brief_entry
{
	my ($e) = @_;
	return sprintf('%.3f %s %s -> %s', $e->{t}, $e->{method}, $e->{path}, $e->{status});
}

# Of sorted arrival times: the most requests in any window [t_i, t_i + 1 s), and the achieved
# rate (n - 1) / (t_last - t_first).
sub window_figures
{
	my @t = @_;
	my ($max, $j) = (0, 0);
	for my $i (0 .. $#t)
	{
		$j = $i if $j < $i;
		$j++ while $j < $#t && $t[ $j + 1 ] < $t[$i] + 1.0;
		$max = $j - $i + 1 if $j - $i + 1 > $max;
	}
	my $rate = (@t > 1 && $t[-1] > $t[0]) ? (@t - 1) / ($t[-1] - $t[0]) : 0;
	return ($max, $rate);
}

# The smallest gap between consecutive arrival times.
sub min_gap
{
	my @t = @_;
	my $min;
	for my $i (1 .. $#t)
	{
		my $g = $t[$i] - $t[ $i - 1 ];
		$min = $g if !defined $min || $g < $min;
	}
	return $min // 0;
}

# ---------------------------------------------------------------------------
# Helpers: the database
# ---------------------------------------------------------------------------

sub budget_of { return row("SELECT * FROM sync.budgets WHERE source = '$_[0]'"); }

# (psql exit code, stderr) of a query expected to fail; errors carry their SQLSTATE.
sub sql_error
{
	my ($query, @params) = @_;
	my ($out, $err) = ('', '');
	my $ret = $node->psql('postgres', "\\set VERBOSITY verbose\n$query", stdout => \$out, stderr => \$err,
		@params);
	return ($ret, $err);
}

# Epoch (server clock) at which $cond first holds, polled in the server every 20 ms; undef on timeout.
sub visible_at
{
	my ($cond, $timeout) = @_;
	my $r = eval {
		sql("SET statement_timeout = '${timeout}s'; "
			  . "DO \$\$ BEGIN WHILE NOT ($cond) LOOP PERFORM pg_sleep(0.02); END LOOP; END \$\$; "
			  . 'SELECT extract(epoch FROM clock_timestamp())');
	};
	return $r;
}

# Let the measurement run until $t (a measuring period, not a wait for a condition).
sub sleep_until
{
	my ($t) = @_;
	usleep(int(($t - time) * 1e6)) if $t > time;
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

my $S1 = start_fake('salesforce', 's1', '--records', 12000, '--accounts', 200, '--seed', 7);
my $S4 = start_fake('salesforce', 's4', '--records', 30, '--accounts', 25, '--seed', 8);
my $S9 = start_fake('salesforce', 's9', '--records', 30, '--accounts', 10, '--seed', 9);
my $AT = start_fake('airtable', 'at', '--bases', 2, '--tables', 1, '--records', 400, '--rate-limit', 0,
	'--token-rate-limit', 0, '--seed', 3);
my $ST = start_fake('stripe', 'st', '--customers', 120, '--deleted-customers', 0, '--products', 2, '--prices', 2,
	'--subscriptions', 2, '--invoices', 2, '--payment-intents', 2, '--charges', 2, '--rate-limit', 0,
	'--endpoint-rate-limit', 0);
my $HS = start_fake('hubspot', 'hs', '--contacts', 40, '--companies', 5, '--deals', 5, '--cars', 2,
	'--archived', 0, '--seed', 4);

$node = start_node(max_backoff => 4);    # and CREATE EXTENSION sync
ok(wait_sql(60, 'SELECT sync.worker_pid() IS NOT NULL'), 'the database has its sync worker');
my $worker_pid = sql('SELECT sync.worker_pid()');
note('setup done at ' . elapsed());

# ---------------------------------------------------------------------------
# 1-3. Window test, a budget changed while running, fair share (Salesforce, 12,000 Contacts)
# ---------------------------------------------------------------------------

sql("SELECT sync.create_source('sf1', 'salesforce', '$S1->{url}', '$sf_creds', "
	  . "'{\"requests_per_second\": 5, \"burst\": 1, \"batch_size\": 200}')");
is(sql("SELECT sync.add_collection('sf1', 'Account')"), 'sf1.account', 'sf1: add_collection Account');
is(sql("SELECT sync.wait_for_backfill('sf1', 'Account', '60s')"), 't', 'sf1: Account backfill completes');
is(sql('SELECT count(*) FROM sf1.account'), '200', 'sf1: 200 accounts synced');

admin($S1, 'DELETE', 'requests');
is(sql("SELECT sync.add_collection('sf1', 'Contact')"), 'sf1.contact', 'sf1: add_collection Contact');
my $t_contact_added = time;
ok(wait_sql(30, "SELECT backfill_records >= 400 FROM sync.status WHERE source = 'sf1' AND collection = 'Contact'"),
	'sf1: the Contact backfill is under way');
{
	my $b = budget_of('sf1');
	cmp_ok($b->{requests_per_second}, '==', 5, 'sf1 budgets: requests_per_second 5');
	cmp_ok($b->{burst}, '==', 1, 'sf1 budgets: burst 1');
	is($b->{basis}, 'requests_per_second 5', "sf1 budgets: basis 'requests_per_second 5'");
	ok(!defined $b->{limited_by}, 'sf1 budgets: not limited by a daily share (only an absolute rate was given)');
	cmp_ok($b->{used_requests_per_second}, '>', 0,
		"sf1 budgets: used_requests_per_second > 0 during the backfill ($b->{used_requests_per_second})");
	is($b->{daily_limit}, 1000000, "sf1 budgets: daily_limit from Sforce-Limit-Info (the fake's 1000000)");
}

# 3. Fair share: an Account change made during the Contact backfill reaches the table within
#    est_max_lag + 2 s.
sleep_until($t_contact_added + 6);    # six seconds into the Contact backfill
{
	my $acc = admin($S1, 'GET', 'records/Account')->[17];
	my $est = sql("SELECT extract(epoch FROM est_max_lag) FROM sync.status WHERE source = 'sf1' AND collection = 'Account'");
	ok($est ne '' && $est > 0 && $est < 5, "sf1: est_max_lag of Account is ${est}s");
	my $name = 'Fair Share ' . int(rand(1e6));
	my $t_patch = time;
	admin($S1, 'PATCH', "records/Account/$acc->{Id}", { Name => $name });
	my $seen = visible_at("EXISTS (SELECT 1 FROM sf1.account WHERE id = '$acc->{Id}' AND name = " . lit($name) . ')', 30);
	ok(defined $seen, 'sf1: the Account update reached the table');
	my $lag = defined $seen ? $seen - $t_patch : 999;
	my $est_after = sql("SELECT extract(epoch FROM est_max_lag) FROM sync.status WHERE source = 'sf1' AND collection = 'Account'");
	my $bound = ($est > $est_after ? $est : $est_after) + 2;
	cmp_ok($lag, '<=', $bound, sprintf('sf1: the Account update appeared after %.2fs <= est_max_lag + 2 s (%.2fs)', $lag, $bound));
	my $c = status_of('sf1', 'Contact');
	is($c->{phase}, 'backfill', "sf1: the Contact backfill was still running ($c->{backfill_records} of 12000 records)");
	diag(sprintf('fair share: Account update visible %.3fs after the change; est_max_lag %ss', $lag, $est));
}

# 2. Change the budget mid-backfill.
sleep_until($t_contact_added + 14);   # fourteen seconds into the Contact backfill
my $t_alter_begin = time;
sql("SELECT sync.alter_source('sf1', options => '{\"requests_per_second\": 10}')");
my $t_alter = time;
{
	my $c = status_of('sf1', 'Contact');
	is($c->{phase}, 'backfill', "sf1: altered mid-backfill ($c->{backfill_records} of 12000 records in)");
}
ok(wait_sql(10, "SELECT requests_per_second = 10 AND basis = 'requests_per_second 10' FROM sync.budgets WHERE source = 'sf1'"),
	'sf1 budgets: requests_per_second 10 after alter_source');
is(sql("SELECT sync.wait_for_backfill('sf1', 'Contact', '120s')"), 't', 'sf1: the Contact backfill completes');
sleep_until($t_alter + 8);            # eight seconds at the new budget
my $t_part2_end = time;
is(sql('SELECT count(*) FROM sf1.contact'), '12000', 'sf1: 12000 contacts synced');
sql("SELECT sync.pause('sf1')");
{
	my $log = fake_log($S1);
	my $bad = grep { $_->{status} != 200 } @$log;
	is($bad, 0, 'sf1: every request of the run was answered 200');

	# 1. Requests made during the backfill at 5/s: from the first after add_collection to the alter.
	# The token bucket spaces acquisitions at least 1/rate apart, so a half-open window of 1 s
	# holds at most 5 of them; arrival jitter of a few ms can make it 6 = floor(burst + rate),
	# which is the promise (burst + rate * T for a window of T = 1 s). 7 would need a request
	# delayed by more than 0.2 s against its successors.
	my @t1 = map { $_->{t} } grep { $_->{t} >= $t_contact_added && $_->{t} < $t_alter_begin } @$log;
	my ($max1, $rate1) = window_figures(@t1);
	diag(sprintf('window test at 5/s, burst 1: %d requests over %.2fs, max %d in a 1 s window (bound %d), achieved %.3f/s (%.1f%% of 5)',
		scalar(@t1), $t1[-1] - $t1[0], $max1, floor(1 + 5), $rate1, $rate1 / 5 * 100));
	cmp_ok(scalar(@t1), '>=', 50, 'window test: at least 50 requests during the backfill at 5/s');
	cmp_ok($max1, '<=', floor(1 + 5), 'window test: no window [t, t + 1 s) holds more than floor(burst + rate) = 6 requests');
	cmp_ok($rate1, '>=', 0.95 * 5, 'window test: achieved rate >= 95% of 5/s');
	cmp_ok($rate1, '<=', 5 * 1.02, 'window test: achieved rate not above the budget (2% for arrival jitter)');

	# 2. After the alter committed, skipping one request (a step in progress keeps the old rate).
	my @after = grep { $_->{t} > $t_alter && $_->{t} <= $t_part2_end } @$log;
	shift @after;
	my @t2 = map { $_->{t} } @after;
	my ($max2, $rate2) = window_figures(@t2);
	diag(sprintf('after alter to 10/s: %d requests over %.2fs, max %d in a 1 s window (bound %d), achieved %.3f/s (%.1f%% of 10)',
		scalar(@t2), $t2[-1] - $t2[0], $max2, floor(1 + 10), $rate2, $rate2 / 10 * 100));
	cmp_ok(scalar(@t2), '>=', 50, 'alter: at least 50 requests at the new budget');
	cmp_ok($max2, '<=', floor(1 + 10), 'alter: no window [t, t + 1 s) holds more than floor(1 + 10) = 11 requests');
	cmp_ok($rate2, '>=', 0.9 * 10, 'alter: achieved rate >= 90% of 10/s');
	cmp_ok($rate2, '<=', 10 * 1.03, 'alter: achieved rate not above the new budget');
}
sql("SELECT sync.drop_source('sf1', true)");
note('parts 1-3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. Default budget: quota_fraction 0.3 of the org's daily allocation spread over the day
# ---------------------------------------------------------------------------

admin($S4, 'POST', 'limits', { max => 864000, used => 0 });
sql("SELECT sync.create_source('sf4', 'salesforce', '$S4->{url}', '$sf_creds', '{\"requests_per_second\": 20}')");
is(sql("SELECT sync.add_collection('sf4', 'Account')"), 'sf4.account', 'sf4: add_collection Account');
is(sql("SELECT sync.wait_for_backfill('sf4', 'Account', '60s')"), 't', 'sf4: Account backfill completes');

# Measure the pace of the source's requests for $secs seconds after $t0 (skipping the first).
sub pace_after
{
	my ($fake, $t0, $secs) = @_;
	sleep_until($t0 + $secs);
	my @t = map { $_->{t} } grep { $_->{t} > $t0 && $_->{t} <= $t0 + $secs } @{ fake_log($fake) };
	shift @t;
	return (scalar(@t), window_figures(@t), min_gap(@t));
}

my $t_default = time;
sql("SELECT sync.alter_source('sf4', options => '{\"requests_per_second\": null}')");
$t_default = time;
is(sql("SELECT options ? 'requests_per_second' FROM sync.sources WHERE name = 'sf4'"), 'f',
	'sf4: requests_per_second removed (null removes a key)');
ok(wait_sql(10, "SELECT basis LIKE '30%' FROM sync.budgets WHERE source = 'sf4'"), 'sf4: the default budget applies');
{
	my $b = budget_of('sf4');
	cmp_ok(abs($b->{quota_fraction} - 0.3), '<', 1e-9, "sf4 budgets: quota_fraction $b->{quota_fraction} (Salesforce default 0.3)");
	cmp_ok(abs($b->{api_requests_per_second} - 10), '<', 1e-9,
		"sf4 budgets: api_requests_per_second $b->{api_requests_per_second} = 864000 / 86400 = 10");
	cmp_ok(abs($b->{requests_per_second} - 3), '<', 1e-9, "sf4 budgets: requests_per_second $b->{requests_per_second} = 0.3 x 10 = 3");
	is($b->{basis}, "30% of the org's 864000 API requests a day", 'sf4 budgets: basis names the daily allocation');
	ok(!defined $b->{limited_by}, 'sf4 budgets: limited_by null (the daily share is the rate itself)');
	is($b->{daily_limit}, 864000, 'sf4 budgets: daily_limit 864000');
	cmp_ok($b->{daily_remaining}, '<=', 864000, "sf4 budgets: daily_remaining shown ($b->{daily_remaining})");
	cmp_ok($b->{daily_remaining}, '>', 863000, 'sf4 budgets: daily_remaining close to the limit');
}
{
	my ($n, $max, $rate, $gap) = pace_after($S4, $t_default, 6);
	diag(sprintf('default budget 3/s: %d requests, max %d in 1 s, achieved %.3f/s, min gap %.3fs', $n, $max, $rate, $gap));
	cmp_ok($n, '>=', 10, 'sf4 log: requests at the default budget');
	cmp_ok($max, '<=', floor(1 + 3), 'sf4 log: at most floor(1 + 3) = 4 requests in any 1 s window');
	cmp_ok($rate, '>=', 0.9 * 3, 'sf4 log: pace >= 90% of 3/s');
	cmp_ok($rate, '<=', 3 * 1.05, 'sf4 log: pace not above 3/s');
}

sql("SELECT sync.alter_source('sf4', options => '{\"quota_fraction\": 0.5}')");
my $t_half = time;
ok(wait_sql(10, "SELECT requests_per_second = 5 AND quota_fraction = 0.5 AND api_requests_per_second = 10 "
	  . "AND basis = '50% of the org''s 864000 API requests a day' FROM sync.budgets WHERE source = 'sf4'"),
	'sf4 budgets: quota_fraction 0.5 gives 5/s');
{
	my ($n, $max, $rate, $gap) = pace_after($S4, $t_half, 5);
	diag(sprintf('quota_fraction 0.5 (5/s): %d requests, max %d in 1 s, achieved %.3f/s, min gap %.3fs', $n, $max, $rate, $gap));
	cmp_ok($max, '<=', floor(1 + 5), 'sf4 log: at most floor(1 + 5) = 6 requests in any 1 s window');
	cmp_ok($rate, '>=', 0.9 * 5, 'sf4 log: pace >= 90% of 5/s');
	cmp_ok($rate, '<=', 5 * 1.05, 'sf4 log: pace not above 5/s');
}
for my $bad ('0', '1.5', '"x"')
{
	my ($ret, $err) = sql_error("SELECT sync.alter_source('sf4', options => '{\"quota_fraction\": $bad}')");
	isnt($ret, 0, "alter_source with quota_fraction $bad fails");
	like($err, qr/ERROR:  22023: option "quota_fraction" must be a number greater than 0 and at most 1/,
		"quota_fraction $bad: SQLSTATE 22023 and what is allowed");
}
is(sql("SELECT options->>'quota_fraction' FROM sync.sources WHERE name = 'sf4'"), '0.5',
	'sf4: the failed alters left quota_fraction 0.5');
{
	my ($ret, $err) = sql_error("SELECT sync.create_source('sfbad', 'salesforce', '$S4->{url}', '$sf_creds', '{\"quota_fraction\": 0}')");
	like($err, qr/ERROR:  22023: option "quota_fraction"/, 'create_source with quota_fraction 0 fails with 22023');
}

# ---------------------------------------------------------------------------
# 5. Daily allocation nearly spent, then spent
# ---------------------------------------------------------------------------

admin($S4, 'POST', 'limits', { used => 864000 - 20000 });
ok(wait_sql(10, "SELECT limited_by LIKE 'daily allocation nearly spent%' FROM sync.budgets WHERE source = 'sf4'"),
	'sf4 budgets: limited_by says the daily allocation is nearly spent');
{
	my $r = row("SELECT b.*, s.waiting_on FROM sync.budgets b JOIN sync.status s USING (source) "
		  . "WHERE b.source = 'sf4' AND s.collection = 'Account'");
	like($r->{limited_by}, qr/^daily allocation nearly spent: (\d+) of 864000 requests left$/,
		"sf4: limited_by '$r->{limited_by}'");
	my ($left) = $r->{limited_by} =~ /: (\d+) of/;
	ok(defined $left && $left <= 20000 && $left > 19000, 'sf4: about 20000 requests left');
	is($r->{daily_limit}, 864000, 'sf4 budgets: daily_limit 864000');
	cmp_ok(abs($r->{daily_remaining} - $left), '<=', 50, "sf4 budgets: daily_remaining $r->{daily_remaining}");
	ok($r->{quota_headroom} >= 0.022 && $r->{quota_headroom} <= 0.024, "sf4 budgets: quota_headroom $r->{quota_headroom}");
	cmp_ok($r->{requests_per_second}, '<', 5, "sf4 budgets: requests_per_second lowered ($r->{requests_per_second})");
	my $want = 5 * $r->{daily_remaining} / (0.05 * 864000);
	cmp_ok(abs($r->{requests_per_second} - $want), '<', 0.02,
		sprintf('sf4 budgets: requests_per_second = 5 x remaining / 5%% of the limit (%.3f)', $want));
	is($r->{waiting_on}, $r->{limited_by}, 'sf4 status: waiting_on shows the nearly spent allocation');
}

# Spent: the fake answers 403 REQUEST_LIMIT_EXCEEDED (no Retry-After): a 300 s penalty.
admin($S4, 'DELETE', 'requests');
admin($S4, 'POST', 'limits', { used => 864000 });
ok(wait_sql(20, "SELECT state = 'rate limited' FROM sync.status WHERE source = 'sf4' AND collection = 'Account'"),
	"sf4: the spent allocation shows as state 'rate limited'");
my ($t403, $t403_seen);
{
	$t403_seen = time;
	my $st = status_of('sf4', 'Account');
	my $b = budget_of('sf4');
	like($st->{last_error}, qr/HTTP 403 REQUEST_LIMIT_EXCEEDED/, 'sf4: last_error names REQUEST_LIMIT_EXCEEDED');
	is($st->{consecutive_failures}, 0, 'sf4: a rate limit is no failure (consecutive_failures 0)');
	like($st->{waiting_on}, qr/^rate limit: the org's daily API allocation is spent \(HTTP 403\), until /,
		'sf4: waiting_on names the penalty');
	is($b->{penalty_reason}, "the org's daily API allocation is spent (HTTP 403)", 'sf4 budgets: penalty_reason');
	my $left = sql("SELECT extract(epoch FROM penalty_until - now()) FROM sync.budgets WHERE source = 'sf4'");
	ok($left > 280 && $left <= 331, sprintf('sf4 budgets: penalty_until %.0fs ahead (300 s + up to 10%% jitter)', $left));
	my @e = @{ fake_log($S4) };
	my @r403 = grep { $_->{status} == 403 } @e;
	is(scalar(@r403), 1, 'sf4: the fake answered exactly one 403');
	$t403 = @r403 ? $r403[0]{t} : time;
	is($e[-1]{status}, 403, 'sf4: the 403 is the last request of the source') or diag(brief_entry($e[-1]));
	like(sql("SELECT stat.rate_limited || ' ' || stat.errors FROM sync.stat_collections stat WHERE source = 'sf4'"),
		qr/^1 0$/, 'sf4 stats: rate_limited 1, errors 0');
}
# Raising the allocation does not lift the source's penalty (sync cannot know): run_now will.
admin($S4, 'POST', 'limits', { used => 0, max => 864000 });
note('part 5 (nearly spent, spent) at ' . elapsed() . '; the penalty is checked again later');

# ---------------------------------------------------------------------------
# 9 (first half). Statistics source: started now, checked at the end
# ---------------------------------------------------------------------------

admin($S9, 'POST', 'objects', { name => 'Widget_9__c', records => 450 });
admin($S9, 'DELETE', 'requests');
sql("SELECT sync.create_source('sf9', 'salesforce', '$S9->{url}', '$sf_creds', '{\"requests_per_second\": 5, \"batch_size\": 200}')");
my $W9 = sql("SELECT sync.add_collection('sf9', 'Widget_9__c')");
like($W9, qr/^sf9\.widget_9__c$/, "sf9: add_collection Widget_9__c creates $W9");

# ---------------------------------------------------------------------------
# 6. Airtable's 30-second penalty
# ---------------------------------------------------------------------------

my $at_admin = admin($AT, 'GET', '');
my ($base_a, $base_b) = @{ $at_admin->{bases} };
my $at_pat = $at_admin->{pat};
my $at_table_a = admin($AT, 'GET', "schema/$base_a")->{tables}[0];
my $at_table_b = admin($AT, 'GET', "schema/$base_b")->{tables}[0];

sql("SELECT sync.create_source('atb', 'airtable', '$AT->{url}', '{\"access_token\": \"$at_pat\"}', "
	  . "'{\"base_id\": \"$base_b\", \"requests_per_second\": 1.5}')");
is(sql("SELECT sync.add_collection('atb', 'Contacts')"), 'atb.contacts', 'atb: add_collection Contacts');
is(sql("SELECT sync.wait_for_backfill('atb', 'Contacts', '60s')"), 't', 'atb: backfill of the other base completes');

admin($AT, 'POST', 'rate_limits', { per_base => 2, per_token => 0, penalty => 30, clear_penalties => JSON::PP::true });
admin($AT, 'DELETE', 'requests');
sql("SELECT sync.create_source('ata', 'airtable', '$AT->{url}', '{\"access_token\": \"$at_pat\"}', "
	  . "'{\"base_id\": \"$base_a\", \"requests_per_second\": 4}')");
is(sql("SELECT sync.add_collection('ata', 'Contacts')"), 'ata.contacts', 'ata: add_collection Contacts');
ok(wait_sql(30, "SELECT state = 'rate limited' FROM sync.status WHERE source = 'ata'"),
	"ata: 4 requests/s against the base's 2 gives a 429: state 'rate limited'");
sql("SELECT sync.alter_source('ata', options => '{\"requests_per_second\": 1.5}')");
my $t_ata_429;
{
	my $st = status_of('ata', 'Contacts');
	like($st->{waiting_on}, qr/^rate limit: Airtable's 30-second penalty after too many requests \(HTTP 429\), until /,
		'ata: waiting_on names the 30-second penalty');
	like($st->{last_error}, qr/HTTP 429 RATE_LIMIT_REACHED/, 'ata: last_error has the 429');
	is($st->{consecutive_failures}, 0, 'ata: consecutive_failures 0');
	is($st->{phase}, 'backfill', "ata: rate limited mid-backfill ($st->{backfill_records} of 400 records in)");
	my @e = grep { index($_->{path}, $base_a) >= 0 } @{ fake_log($AT) };
	my ($first) = grep { $_->{status} == 429 } @e;
	ok(defined $first, 'ata: the fake logged the 429') or diag(join("\n", map { brief_entry($_) } @e));
	$t_ata_429 = $first ? $first->{t} : time;
}

# The other base keeps syncing during the penalty.
{
	my $rec = admin($AT, 'GET', "records/$base_b/$at_table_b->{id}")->[5];
	my $name = 'Still syncing ' . int(rand(1e6));
	admin($AT, 'PATCH', "records/$base_b/$at_table_b->{id}/$rec->{id}", { fields => { Name => $name } });
	my $seen = visible_at("EXISTS (SELECT 1 FROM atb.contacts WHERE id = '$rec->{id}' AND name = " . lit($name) . ')', 25);
	ok(defined $seen, 'atb: a change in the other base reached its table');
	ok(defined $seen && $seen < $t_ata_429 + 30,
		sprintf('atb: ... %.1fs after the 429 of base A, inside its 30 s penalty', ($seen // 0) - $t_ata_429));
	is(sql("SELECT state FROM sync.status WHERE source = 'ata'"), 'rate limited', 'ata: still rate limited meanwhile');
}

# ---------------------------------------------------------------------------
# 7. Stripe: Retry-After
# ---------------------------------------------------------------------------

my $st_key = admin($ST, 'GET', 'keys')->[0]{key};
sql("SELECT sync.create_source('st', 'stripe', '$ST->{url}', '{\"secret_key\": \"$st_key\"}', "
	  . "'{\"requests_per_second\": 20, \"poll_interval\": 0.2}')");
is(sql("SELECT sync.add_collection('st', 'customers')"), 'st.customers', 'st: add_collection customers');
is(sql("SELECT sync.wait_for_backfill('st', 'customers', '60s')"), 't', 'st: backfill completes');

# The gap between a 429 and the source's next request, from the fake's log.
sub stripe_gap
{
	my ($fault, $label) = @_;
	admin($ST, 'DELETE', 'requests');
	admin($ST, 'POST', 'faults', $fault);
	my ($t429, $next);
	wait_until(30, sub {
		my @e = @{ fake_log($ST) };
		my ($i) = grep { $e[$_]{status} == 429 } 0 .. $#e;
		return 0 unless defined $i && $i < $#e;
		($t429, $next) = ($e[$i]{t}, $e[ $i + 1 ]{t});
		return 1;
	});
	ok(defined $next, "st: $label: a 429 and a request after it");
	return defined $next ? $next - $t429 : 0;
}
{
	my $gap = stripe_gap({ path_regex => '^/v1/events', status => 429, count => 1, headers => { 'Retry-After' => '3' } },
		'Retry-After: 3');
	diag(sprintf('stripe: next request %.3fs after a 429 with Retry-After: 3', $gap));
	cmp_ok($gap, '>=', 3, 'st: after a 429 with Retry-After: 3 the next request comes >= 3 s later');
	cmp_ok($gap, '<', 3 * 1.1 + 1.5, 'st: ... and not much later');
	ok(wait_sql(10, "SELECT state = 'syncing' FROM sync.status WHERE source = 'st'"), 'st: syncing again');
	$gap = stripe_gap({ path_regex => '^/v1/events', status => 429, count => 1 }, 'no Retry-After');
	diag(sprintf('stripe: next request %.3fs after a 429 without Retry-After', $gap));
	cmp_ok($gap, '>=', 1, 'st: after a 429 without Retry-After the next request comes >= 1 s later');
	cmp_ok($gap, '<', 2.5, 'st: ... and not the 3 s of before');
	my $s = row("SELECT * FROM sync.stat_collections WHERE source = 'st'");
	is($s->{rate_limited}, 2, 'st stats: rate_limited 2');
}
sql("SELECT sync.drop_source('st')");

# ---------------------------------------------------------------------------
# 8. HubSpot usage headers
# ---------------------------------------------------------------------------

admin($HS, 'POST', 'limits', { daily_max => 864000, daily_used => 0, burst_max => 100 });
sql("SELECT sync.create_source('hs', 'hubspot', '$HS->{url}', '{\"access_token\": \"$HS_PAT\"}', "
	  . "'{\"quota_fraction\": 0.5, \"poll_interval\": 1}')");
is(sql("SELECT sync.add_collection('hs', 'contacts')"), 'hs.contacts', 'hs: add_collection contacts');
is(sql("SELECT sync.wait_for_backfill('hs', 'contacts', '60s')"), 't', 'hs: backfill completes');
ok(wait_sql(20, "SELECT daily_limit = 864000 AND requests_per_second = 5 FROM sync.budgets WHERE source = 'hs'"),
	'hs budgets: the usage headers were read');
{
	my $b = budget_of('hs');
	my $used = admin($HS, 'POST', 'limits', {})->{daily_used};
	is($b->{daily_limit}, 864000, 'hs budgets: daily_limit 864000 (X-HubSpot-RateLimit-Daily)');
	ok($b->{daily_remaining} <= 864000 && $b->{daily_remaining} >= 864000 - $used,
		"hs budgets: daily_remaining $b->{daily_remaining} (the fake counted $used)");
	cmp_ok($b->{quota_headroom}, '==', 1, "hs budgets: quota_headroom $b->{quota_headroom}");
	cmp_ok($b->{quota_fraction}, '==', 0.5, 'hs budgets: quota_fraction 0.5');
	cmp_ok($b->{api_requests_per_second}, '==', 10, 'hs budgets: api_requests_per_second = 100 per 10 s (X-HubSpot-RateLimit-Max)');
	cmp_ok($b->{search_requests_per_second} // -1, '==', 2.5, 'hs budgets: search_requests_per_second = 0.5 x 5');
	cmp_ok($b->{requests_per_second}, '==', 5, 'hs budgets: requests_per_second = min(0.5 x 10, 0.5 x 864000 / 86400) = 5');
	is($b->{basis}, "50% of HubSpot's 100 requests per 10 s and 864000 a day", 'hs budgets: basis');
	ok(defined $b->{quota_seen_at}, 'hs budgets: quota_seen_at set');
}
sql("SELECT sync.drop_source('hs')");

# ---------------------------------------------------------------------------
# 5 (end). The spent allocation's penalty holds for 20 s; then run_now lifts it
# ---------------------------------------------------------------------------

sleep_until($t403 + 20.5);            # twenty seconds since the 403
{
	my @after = grep { $_->{t} > $t403 } @{ fake_log($S4) };
	is(scalar(@after), 0, sprintf('sf4: no request for %.0fs after the 403 (a raised allocation notwithstanding)',
		time - $t403)) or diag(join("\n", map { brief_entry($_) } @after));
	my $st = status_of('sf4', 'Account');
	is($st->{state}, 'rate limited', 'sf4: still rate limited');
	ok(defined budget_of('sf4')->{penalty_until}, 'sf4 budgets: the penalty is still in force');
	is(sql('SELECT sync.worker_pid()'), $worker_pid, 'the worker pid is unchanged through the penalties');
}
{
	my $t_lift = time;
	sql("SELECT sync.run_now('sf4')");
	ok(wait_sql(20, "SELECT state = 'syncing' AND last_poll_at > to_timestamp($t_lift) FROM sync.status "
		  . "WHERE source = 'sf4' AND collection = 'Account'"), 'sf4: run_now lifts the penalty and polling resumes');
	ok(!defined budget_of('sf4')->{penalty_until}, 'sf4 budgets: no penalty after run_now');
	my @after = grep { $_->{t} > $t_lift && $_->{status} == 200 } @{ fake_log($S4) };
	cmp_ok(scalar(@after), '>', 0, 'sf4: the fake answers the source again');
}
sql("SELECT sync.drop_source('sf4', true)");

# A REQUEST_LIMIT_EXCEEDED with Retry-After mid-backfill: the page is retried after the penalty, none lost.
admin($S4, 'POST', 'objects', { name => 'Widget_5__c', records => 1000 });
admin($S4, 'DELETE', 'requests');
admin($S4, 'POST', 'faults', { path_regex => '/query/[A-Za-z0-9]+-\d+', status => 403, count => 1,
		headers => { 'Retry-After' => '2' } });
sql("SELECT sync.create_source('sf5', 'salesforce', '$S4->{url}', '$sf_creds', '{\"requests_per_second\": 10, \"batch_size\": 200}')");
my $W5 = sql("SELECT sync.add_collection('sf5', 'Widget_5__c')");
is(sql("SELECT sync.wait_for_backfill('sf5', 'Widget_5__c', '60s')"), 't', 'sf5: backfill completes after a 403 mid-backfill');
{
	my @e = @{ fake_log($S4) };
	my ($i) = grep { $e[$_]{status} == 403 } 0 .. $#e;
	ok(defined $i && $i < $#e, 'sf5: the fake answered a page 403 REQUEST_LIMIT_EXCEEDED');
	if (defined $i && $i < $#e)
	{
		my $gap = $e[ $i + 1 ]{t} - $e[$i]{t};
		cmp_ok($gap, '>=', 2, sprintf('sf5: the next request came %.2fs later (Retry-After: 2)', $gap));
		is($e[ $i + 1 ]{path}, $e[$i]{path}, 'sf5: ... asking for the same page again');
	}
	my $fake_ids = join(',', map { $_->{Id} } @{ admin($S4, 'GET', 'records/Widget_5__c') });
	is(sql("SELECT string_agg(id, ',' ORDER BY id COLLATE \"C\") FROM $W5"), $fake_ids, 'sf5: no page lost: the table holds every id');
	my $st = status_of('sf5', 'Widget_5__c');
	is($st->{backfill_records}, 1000, 'sf5: backfill_records 1000 (the refused page counted once)');
	is(sql("SELECT rate_limited FROM sync.stat_collections WHERE source = 'sf5'"), '1', 'sf5 stats: rate_limited 1');
}
sql("SELECT sync.drop_source('sf5', true)");

# ---------------------------------------------------------------------------
# 6 (end). After the penalty: the tables equal the fake
# ---------------------------------------------------------------------------

is(sql("SELECT sync.wait_for_backfill('ata', 'Contacts', '90s')"), 't', 'ata: backfill completes after the penalty');
{
	my @e = grep { index($_->{path}, $base_a) >= 0 } @{ fake_log($AT) };
	my ($i) = grep { $e[$_]{status} == 429 } 0 .. $#e;
	ok(defined $i && $i < $#e, 'ata: requests followed the 429');
	if (defined $i && $i < $#e)
	{
		my $gap = $e[ $i + 1 ]{t} - $e[$i]{t};
		diag(sprintf('airtable: next request to the base %.2fs after its first 429', $gap));
		cmp_ok($gap, '>=', 30, sprintf('ata: no request to the base for %.1fs (>= 30 s) after the first 429', $gap));
	}
	my $n429 = grep { $_->{status} == 429 } @e;
	is($n429, 1, 'ata: one 429 in all (1.5/s stays within the base limit)');
	my @other = grep { index($_->{path}, $base_b) >= 0 && $_->{status} == 200
		  && $_->{t} > $t_ata_429 && $_->{t} < $t_ata_429 + 30 } @{ fake_log($AT) };
	cmp_ok(scalar(@other), '>=', 10, scalar(@other) . ' requests to the other base were answered during the penalty');

	my $pk = $at_table_a->{primaryFieldId};
	my $col = sql("SELECT column_name FROM sync.columns WHERE source = 'ata' AND api_field = '$pk'");
	is($col, 'name', 'ata: the primary field is column name');
	my $recs = admin($AT, 'GET', "records/$base_a/$at_table_a->{id}");
	is(scalar(@$recs), 400, 'ata: the fake base holds 400 records');
	my $want = join("\n", map { "$_->{id}|" . ($_->{fields}{$pk} // '') } sort { $a->{id} cmp $b->{id} } @$recs);
	my $got = sql("SELECT string_agg(id || '|' || coalesce(name, ''), E'\\n' ORDER BY id COLLATE \"C\") FROM ata.contacts");
	# psql's output is UTF-8 bytes: compare bytes with bytes
	ok($got eq encode_utf8($want), 'ata: no page lost: ids and names equal the fake (400 rows)');
	my $s = row("SELECT * FROM sync.stat_collections WHERE source = 'ata'");
	cmp_ok($s->{rate_limited}, '>', 0, "ata stats: rate_limited $s->{rate_limited}");
	is(status_of('ata', 'Contacts')->{state}, 'syncing', 'ata: syncing after the penalty');
}
sql("SELECT sync.drop_source('ata')");
sql("SELECT sync.drop_source('atb')");

# ---------------------------------------------------------------------------
# 9. Statistics equal the fake's request log
# ---------------------------------------------------------------------------

# Pause a source and wait until neither the fake's log nor the statistics move for 2 s.
sub quiesce
{
	my ($fake, $source) = @_;
	sql("SELECT sync.pause('$source')");
	my ($last, $since) = ('', time);
	return wait_until(30, sub {
		my $now = scalar(@{ admin($fake, 'GET', 'requests') }) . ' '
		  . sql("SELECT requests || ' ' || sum_collections FROM (SELECT s.requests, "
			  . "(SELECT sum(requests) FROM sync.stat_collections c WHERE c.source = s.source) AS sum_collections "
			  . "FROM sync.stat_sources s WHERE source = '$source') q");
		($last, $since) = ($now, time) if $now ne $last;
		return time - $since >= 2;
	});
}

is(sql("SELECT sync.wait_for_backfill('sf9', 'Widget_9__c', '60s')"), 't', 'sf9: backfill completes');
ok(quiesce($S9, 'sf9'), 'sf9: paused and quiet');
{
	my @log = @{ fake_log($S9) };
	my $src = row("SELECT * FROM sync.stat_sources WHERE source = 'sf9'");
	my $col = row("SELECT * FROM sync.stat_collections WHERE source = 'sf9'");
	my $outside = grep { $_->{path} =~ m{/sobjects/Widget_9__c/describe$} || $_->{path} eq '/services/oauth2/token' } @log;
	diag(sprintf('stats: fake logged %d requests (%d token/describe); stat_sources %d, stat_collections %d',
		scalar(@log), $outside, $src->{requests}, $col->{requests}));
	is($src->{requests}, scalar(@log), 'sf9: stat_sources.requests = every request the fake logged since create_source');
	is($col->{requests}, scalar(@log) - $outside,
		'sf9: stat_collections.requests = the same without the token and describe of add_collection');
	is($col->{records_upserted}, 450, 'sf9: records_upserted 450');
	is(sql("SELECT count(*) FROM $W9"), '450', 'sf9: 450 rows written');
	cmp_ok($col->{bytes_received}, '>', 450 * 50, "sf9: bytes_received $col->{bytes_received}");
	is($col->{errors} . ' ' . $col->{rate_limited}, '0 0', 'sf9: no errors, no rate limits yet');
}

my $t_reset = sql('SELECT now()');
sql("SELECT sync.reset_stats('sf9')");
{
	my $col = row("SELECT * FROM sync.stat_collections WHERE source = 'sf9'");
	my $src = row("SELECT * FROM sync.stat_sources WHERE source = 'sf9'");
	is(join(' ', map { $col->{$_} } qw(requests records_upserted records_deleted bytes_received errors rate_limited retries)),
		'0 0 0 0 0 0 0', 'sf9: reset_stats zeroes stat_collections');
	is(join(' ', map { $src->{$_} } qw(requests records_upserted bytes_received errors rate_limited retries)),
		'0 0 0 0 0 0', 'sf9: reset_stats zeroes stat_sources');
	is(sql("SELECT stats_reset >= '$t_reset' FROM sync.stat_collections WHERE source = 'sf9'"), 't',
		'sf9: stat_collections.stats_reset set');
	is(sql("SELECT stats_reset >= '$t_reset' FROM sync.stat_sources WHERE source = 'sf9'"), 't',
		'sf9: stat_sources.stats_reset set');
}
admin($S9, 'DELETE', 'requests');
admin($S9, 'POST', 'faults', { path_regex => 'queryAll', status => 503, count => 2 });
my $bulk = admin($S9, 'POST', 'bulk_update/Widget_9__c', { count => 37, fields => { Notes__c => 'after the reset' } });
is(scalar(@{ $bulk->{ids} }), 37, 'sf9: 37 widgets changed in the fake');
sql("SELECT sync.resume('sf9')");
ok(wait_sql(60, "SELECT count(*) = 37 FROM $W9 WHERE notes__c = 'after the reset'"), 'sf9: the 37 changes arrived');
ok(wait_sql(30, "SELECT consecutive_failures = 0 AND errors >= 2 FROM sync.status JOIN sync.stat_collections USING (source, collection) "
	  . "WHERE source = 'sf9'"), 'sf9: the 503s were recorded and recovered from');
ok(wait_until(30, sub { @{ admin($S9, 'GET', 'requests') } >= 30 }), 'sf9: thirty requests since the reset');
ok(quiesce($S9, 'sf9'), 'sf9: paused and quiet again');
{
	my @log = @{ fake_log($S9) };
	my $n503 = grep { $_->{status} == 503 } @log;
	my $col = row("SELECT * FROM sync.stat_collections WHERE source = 'sf9'");
	my $src = row("SELECT * FROM sync.stat_sources WHERE source = 'sf9'");
	diag(sprintf('stats after reset: fake logged %d requests (%d answered 503); stat_collections requests %d, errors %d, retries %d, records_upserted %d',
		scalar(@log), $n503, $col->{requests}, $col->{errors}, $col->{retries}, $col->{records_upserted}));
	is($n503, 2, 'sf9: the fake answered 503 twice');
	is($col->{requests}, scalar(@log), 'sf9: stat_collections.requests = the requests the fake logged since the reset');
	is($src->{requests}, scalar(@log), 'sf9: stat_sources.requests the same');
	is($col->{records_upserted}, 37, 'sf9: records_upserted 37 since the reset');
	is(sql("SELECT count(*) FROM $W9 WHERE _synced_at >= (SELECT stats_reset FROM sync.stat_collections WHERE source = 'sf9')"),
		'37', 'sf9: ... the rows written since the reset');
	cmp_ok($col->{errors}, '>=', 2, "sf9: errors $col->{errors} count the injected 503s");
	cmp_ok($col->{retries}, '>=', 1, "sf9: retries $col->{retries}");
	cmp_ok($col->{bytes_received}, '>', 0, "sf9: bytes_received $col->{bytes_received}");
	is($col->{rate_limited}, 0, 'sf9: rate_limited 0');
	is($src->{errors}, $col->{errors}, 'sf9: stat_sources.errors the same');
}

# PUBLIC reads the views; only the extension's owner resets them.
sql('CREATE ROLE watcher LOGIN');
{
	my $out = $node->safe_psql('postgres',
		"SELECT (SELECT requests FROM sync.stat_collections WHERE source = 'sf9') > 0, "
		  . "(SELECT requests FROM sync.stat_sources WHERE source = 'sf9') > 0, "
		  . "(SELECT requests_per_second FROM sync.budgets WHERE source = 'sf9') = 5",
		extra_params => [ '-U', 'watcher' ]);
	is($out, 't|t|t', 'a non-superuser role reads sync.stat_collections, sync.stat_sources and sync.budgets');
	my ($ret, $err) = sql_error("SELECT sync.reset_stats('sf9')", extra_params => [ '-U', 'watcher' ]);
	isnt($ret, 0, 'a non-superuser role cannot call sync.reset_stats');
	like($err, qr/ERROR:  42501: permission denied for function reset_stats/, '... 42501 permission denied');
	cmp_ok(sql("SELECT requests FROM sync.stat_collections WHERE source = 'sf9'"), '>', 0, 'the statistics stay');
}

is(sql('SELECT sync.worker_pid()'), $worker_pid, 'one worker served every part of the suite');
note('done at ' . elapsed());
done_testing();
