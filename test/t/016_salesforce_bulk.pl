# Salesforce backfills above bulk_threshold go through Bulk API 2.0 query jobs (issue 7):
#   1. a backfill of 8000 Contacts (threshold 3000, results in sets of 1500 rows) copies every
#      record exactly, value by value, hostile text included (quotes, commas, CR/LF, unicode);
#      the request log shows one REST page, one job created, a few state polls, 6 result sets;
#   2. after the backfill, polls bring changes (incremental works from the job's start);
#   3. a crash (immediate shutdown) between result sets resumes from the committed locator:
#      the same job, the locator asked again, no new job;
#   4. a job that ends Failed is reported in sync.status, then a new job is created and the
#      backfill completes (with RFC 4180 minimal quoting this time: empty = null).
# Expected values come from the fake's own records (GET /__admin/records), converted in Perl.
use strict;
use warnings;

use FindBin;
use lib $FindBin::Bin;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use SyncTest;
use Test::More;
use Time::HiRes qw(time);

my $json = JSON::PP->new->utf8->canonical->allow_nonref;
my $creds = '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "test-refresh"}';
my $N = 8000;
my $CHUNK = 1500;
my $SETS = int(($N + $CHUNK - 1) / $CHUNK);    # 6

# ---------------------------------------------------------------------------
# Helpers (the value conversions are those of 002_salesforce.pl)
# ---------------------------------------------------------------------------

sub sf_datetime_epoch
{
	my ($s) = @_;
	my @p = $s =~ /^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|([+-])(\d\d):?(\d\d))$/
	  or return undef;
	my $e = days_from_civil($p[0], $p[1], $p[2]) * 86400 + $p[3] * 3600 + $p[4] * 60 + $p[5];
	$e += "0.$p[6]" if defined $p[6];
	$e -= ($p[8] eq '-' ? -1 : 1) * ($p[9] * 3600 + $p[10] * 60) if $p[7] ne 'Z';
	return $e;
}

my %TEXT_TYPE = map { $_ => 1 }
  qw(id reference string textarea email phone url picklist combobox encryptedstring anyType);
my %NUMBER_TYPE = map { $_ => 1 } qw(double currency percent);

sub expect_canon
{
	my ($type, $v) = @_;
	return 'NULL' unless defined $v;
	return "s:$v" if $TEXT_TYPE{$type};
	return 'a:' . $json->encode([ split /;/, $v ]) if $type eq 'multipicklist';
	return 'b:' . ($v ? 'true' : 'false') if $type eq 'boolean';
	return 'n:' . sprintf('%d', $v) if $type eq 'int';
	return 'n:' . sprintf('%.15g', $v) if $NUMBER_TYPE{$type};
	return "d:$v" if $type eq 'date';
	if ($type eq 'datetime')
	{
		my $e = sf_datetime_epoch($v);
		return defined $e ? sprintf('e:%.3f', $e) : "bad-api-datetime:$v";
	}
	if ($type eq 'time')
	{
		my @p = $v =~ /^(\d\d):(\d\d):(\d\d)(\.\d+)?Z$/ or return "bad-api-time:$v";
		return sprintf('e:%.3f', $p[0] * 3600 + $p[1] * 60 + $p[2] + ($p[3] // 0));
	}
	return 'j:' . $json->encode(canon($v)) if $type eq 'address';
	return "unknown-type:$type";
}

sub got_canon
{
	my ($type, $g) = @_;
	return 'NULL' unless defined $g;
	return ref($g) ? 'bad:ref' : "s:$g" if $TEXT_TYPE{$type};
	return ref($g) eq 'ARRAY' ? 'a:' . $json->encode($g) : "bad:$g" if $type eq 'multipicklist';
	return JSON::PP::is_bool($g) ? 'b:' . ($g ? 'true' : 'false') : "bad:$g" if $type eq 'boolean';
	return $g =~ /^-?\d+$/ ? 'n:' . sprintf('%d', $g) : "bad:$g" if $type eq 'int';
	return 'n:' . sprintf('%.15g', $g) if $NUMBER_TYPE{$type};
	return "d:$g" if $type eq 'date';
	return sprintf('e:%.3f', $g) if $type eq 'datetime' || $type eq 'time';
	return ref($g) eq 'HASH' ? 'j:' . $json->encode(canon($g)) : "bad:$g" if $type eq 'address';
	return "unknown-type:$type";
}

sub select_expr
{
	my ($f) = @_;
	my $col = qq{"$f->{column_name}"};
	my $expr = ($f->{type} eq 'datetime' || $f->{type} eq 'time') ? "extract(epoch FROM $col)" : $col;
	return qq{$expr AS "$f->{api_field}"};
}

# Every column of every row against the fake's live records.
sub compare_table
{
	my ($label, $table, $fields, $expected) = @_;
	my $rows = $json->decode(sql(
		"SELECT coalesce(json_agg(x ORDER BY x.\"Id\"), '[]') FROM (SELECT "
		  . join(', ', map { select_expr($_) } @$fields) . " FROM $table) x"));
	my %got = map { $_->{Id} => $_ } @$rows;
	my %exp = map { $_->{Id} => $_ } @$expected;
	my (@missing, @extra, @diff);
	my $values = 0;
	my %kinds;
	for my $id (sort keys %exp)
	{
		my $g = $got{$id};
		if (!$g)
		{
			push @missing, $id;
			next;
		}
		for my $f (@$fields)
		{
			my $want = expect_canon($f->{type}, $exp{$id}{ $f->{api_field} });
			my $have = got_canon($f->{type}, $g->{ $f->{api_field} });
			$values++;
			$kinds{ substr($want, 0, 1) }++;
			push @diff, "$id $f->{api_field} ($f->{type}): table $have, API $want" if $have ne $want;
		}
	}
	push @extra, grep { !$exp{$_} } sort keys %got;
	is(scalar(@$rows), scalar(@$expected), "$label: " . scalar(@$expected) . ' rows');
	is(scalar(@missing), 0, "$label: no API record missing") or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@extra), 0, "$label: no row the API does not have") or diag("extra: @extra[0 .. ($#extra < 9 ? $#extra : 9)]");
	is(scalar(@diff), 0, "$label: all $values values equal the API's")
	  or diag(join("\n", @diff[0 .. ($#diff < 19 ? $#diff : 19)]));
	# the comparison covered each kind of value (s text, b bool, n number, d date, e time, a array, j address, N null)
	is(join('', sort grep { $kinds{$_} } qw(N a b d e j n s)), 'Nabdejns', "$label: every kind of value compared");
	return \%got;
}

sub is_bulk_create  { return $_[0]->{method} eq 'POST' && $_[0]->{path} =~ m{/jobs/query/?$}; }
sub bulk_state_job  { return $_[0]->{method} eq 'GET' && $_[0]->{path} =~ m{/jobs/query/(\w+)$} ? $1 : undef; }
sub bulk_result_job { return $_[0]->{path} =~ m{/jobs/query/(\w+)/results$} ? $1 : undef; }
sub is_query_start  { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/?$}; }
sub is_query_more   { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/[A-Za-z0-9]+-\d+$}; }
sub brief_entry { my ($e) = @_; return "$e->{method} $e->{path}?" . ($e->{query} // '') . " -> $e->{status}"; }

sub log_of
{
	my ($F) = @_;
	return [ sort { $a->{t} <=> $b->{t} } @{ admin($F, 'GET', 'requests') } ];
}

# The requests up to the last result set: the backfill's (after it, sync.resync's delete
# sweep lists every id with REST queries: SELECT Id FROM Contact ORDER BY Id).
sub backfill_part
{
	my ($log) = @_;
	my ($last) = grep { defined bulk_result_job($log->[$_]) } reverse 0 .. $#$log;
	return defined $last ? [ @$log[ 0 .. $last ] ] : $log;
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

my $A = start_fake('salesforce', 'bulk', { timeout => 120 }, '--records', $N, '--seed', 16);
my $node = start_node(max_backoff => 2);

# Hostile text the CSV must carry: quotes, commas, CR/LF, unicode, a value that looks like null.
my $recs = admin($A, 'GET', 'records/Contact');
is(scalar(@$recs), $N, "the fake holds $N Contacts");
my @ids = map { $_->{Id} } @$recs;
my %hostile = (
	$ids[1] => { Description => qq{line one\nline "two", with a comma\r\nline three}, Title => q{"quoted"} },
	$ids[2] => { Description => "\x{1f389} \x{dc}n\x{ef}c\x{f6}d\x{e9}, \x{d1}", LastName => q{O'Brien, "Jr."} },
	$ids[3] => { Title => 'null', Department => '""', FirstName => ' padded ' },
	$ids[4] => { Description => ",,,\n\n", HasOptedOutOfEmail => JSON::PP::true, Visit_Count__c => -2147483648,
		Lifetime_Value__c => 1234567890123.45, Engagement_Score__c => 0.1, Discount_Rate__c => 99.99 },
	$ids[5] => { Title => undef, Email => undef, Birthdate => undef, Interests__c => 'Sports;Food & Wine' },
);
admin($A, 'PATCH', "records/Contact/$_", $hostile{$_}) for sort keys %hostile;

# Jobs take a while: a few polls happen.
admin($A, 'POST', 'bulk', { processing_delay_s => 1.5 });
admin($A, 'DELETE', 'requests');

sql("SELECT sync.create_source('acme', 'salesforce', '$A->{url}', '$creds', "
	  . "'{\"requests_per_second\": 50, \"poll_interval\": 1, \"bulk_threshold\": 3000, \"bulk_chunk_records\": $CHUNK}')");
is(sql("SELECT sync.add_collection('acme', 'Contact')"), 'acme.contact', 'add_collection creates acme.contact');

# ---------------------------------------------------------------------------
# 1. The backfill through a Bulk API 2.0 query job
# ---------------------------------------------------------------------------

my $t0 = time;
is(sql("SELECT sync.wait_for_backfill('acme', 'Contact', '180s')"), 't', 'the Contact backfill completes');
note(sprintf('backfill of %d records took %.1fs', $N, time - $t0));

my $describe_fields = $json->decode(sql(
	"SELECT json_agg(json_build_object('api_field', api_field, 'type', api_type, 'column_name', column_name) "
	  . "ORDER BY position) FROM sync.columns WHERE source = 'acme' AND collection = 'Contact'"));
ok(scalar(grep { $_->{type} eq 'address' } @$describe_fields), 'the collection has an address field (compound)');

my $st = status_of('acme', 'Contact');
is($st->{phase}, 'incremental', 'status: phase incremental');
is($st->{backfill_records}, $N, "status: backfill_records = $N");
is($st->{backfill_total}, $N, "status: backfill_total = $N");
is($st->{consecutive_failures}, 0, 'status: no failures');
ok(!defined $st->{last_error}, 'status: no error') or diag($st->{last_error});

my $truth = admin($A, 'GET', 'records/Contact');
my $got = compare_table('bulk backfill', 'acme.contact', $describe_fields, $truth);
is($got->{ $ids[1] }{Description}, $hostile{ $ids[1] }{Description}, 'CR/LF, quotes and commas inside a value survive');
is($got->{ $ids[3] }{Title}, 'null', 'the text "null" stays text');
is($got->{ $ids[5] }{Title}, undef, 'an empty value is null');

my $log = log_of($A);
{
	my @creates = grep { is_bulk_create($_) } @$log;
	is(scalar(@creates), 1, 'one Bulk query job created') or diag(join("\n", map { brief_entry($_) } @creates));
	my @polls = grep { defined bulk_state_job($_) } @$log;
	cmp_ok(scalar(@polls), '>=', 1, 'the job state was polled');
	cmp_ok(scalar(@polls), '<=', 12, 'polls are spaced: at most 12 for a job of 1.5 s (' . scalar(@polls) . ')');
	my @results = grep { defined bulk_result_job($_) } @$log;
	is(scalar(@results), $SETS, "$SETS result sets read") or diag(join("\n", map { brief_entry($_) } @results));
	is(scalar(grep { $_->{status} != 200 } @results), 0, 'every result set answered 200');
	is(join(',', map { qparams($_)->{maxRecords} // '' } @results), join(',', ($CHUNK) x $SETS), "maxRecords=$CHUNK");
	my @locators = map { qparams($_)->{locator} // '' } @results;
	is($locators[0], '', 'the first set has no locator');
	my %seen;
	is(scalar(grep { $_ ne '' && !$seen{$_}++ } @locators), $SETS - 1, 'each later set asked by a new locator, once');
	my @queries = grep { is_query_start($_) } @$log;
	is(scalar(@queries), 1, 'one REST query page (its totalSize chose the Bulk API)');
	is(scalar(grep { is_query_more($_) } @$log), 0, 'no REST query page followed');
	my $job = cursor_of('acme', 'Contact');
	ok(!exists $job->{bulk}, 'the cursor no longer holds the job');
	is($job->{mode}, 'incremental', 'cursor mode incremental');
	# the job's SOQL: every field, compound address replaced by its parts, no ORDER BY
	my @polled_jobs = do { my %j; grep { !$j{$_}++ } map { bulk_state_job($_) } @polls };
	is(scalar(@polled_jobs), 1, 'polls ask about one job');
	is(bulk_result_job($results[-1]) // '', $polled_jobs[0] // 'none', 'results come from that job');
}
{
	my $jobs = admin($A, 'GET', 'bulk')->{jobs};
	is(scalar(@$jobs), 1, 'the fake has one job');
	like($jobs->[0]{query} // '', qr/^SELECT [\w,]+ FROM Contact$/, 'job query: a plain SELECT of fields');
	unlike($jobs->[0]{query} // '', qr/\bMailingAddress\b/, 'job query: no compound field');
	like($jobs->[0]{query} // '', qr/\bMailingStreet\b/, 'job query: the address parts');
}

# ---------------------------------------------------------------------------
# 2. Changes after the backfill arrive by polling
# ---------------------------------------------------------------------------

admin($A, 'PATCH', "records/Contact/$ids[10]", { Title => 'changed after the bulk backfill' });
my $new = admin($A, 'POST', 'records/Contact', { LastName => 'Nach-Bulk', FirstName => "Zo\x{eb}" })->{Id};
ok(wait_sql(60, "SELECT title = 'changed after the bulk backfill' FROM acme.contact WHERE id = " . lit($ids[10])),
	'an update made after the backfill arrives');
ok(wait_sql(60, "SELECT count(*) = 1 FROM acme.contact WHERE id = " . lit($new)), 'a record created after the backfill arrives');

# ---------------------------------------------------------------------------
# 3. A crash between result sets resumes from the committed locator
# ---------------------------------------------------------------------------

admin($A, 'POST', 'bulk', { processing_delay_s => 0.3 });
# The fake matches path_regex against path?query: the first set goes through, every later
# one (asked with a locator) fails, so the backfill stops with the first locator committed.
admin($A, 'POST', 'faults', { path_regex => 'jobs/query/\\w+/results\\?.*locator=', status => 503, count => 100000 });
admin($A, 'DELETE', 'requests');
sql("SELECT sync.resync('acme', 'Contact')");
ok(wait_until(90, sub { my $s = status_of('acme', 'Contact'); ($s->{last_error} // '') =~ /503/ && $s->{consecutive_failures} >= 1 }),
	'after resync a new job runs; the second result set fails (503) and the error shows');
my $cur = cursor_of('acme', 'Contact');
my $J = $cur->{bulk}{job} // '';
my $L = $cur->{bulk}{locator};
my $committed = status_of('acme', 'Contact')->{backfill_records};
note("crash with job $J at locator " . ($L // 'none') . ", $committed records committed");
ok($cur->{bulk}{complete}, 'the cursor holds the completed job');
ok(defined $L && $L ne '', 'the cursor holds the next locator');
is($committed, $CHUNK, "the first set ($CHUNK records) is committed");
$node->stop('immediate');
admin($A, 'DELETE', 'faults');
admin($A, 'DELETE', 'requests');
$node->start;
is(sql("SELECT sync.wait_for_backfill('acme', 'Contact', '180s')"), 't', 'the backfill completes after the crash');
$log = backfill_part(log_of($A));
{
	my @creates = grep { is_bulk_create($_) } @$log;
	is(scalar(@creates), 0, 'no job created after the crash') or diag(join("\n", map { brief_entry($_) } @creates));
	my @results = grep { defined bulk_result_job($_) } @$log;
	ok(@results >= 1, 'result sets read after the crash');
	is(bulk_result_job($results[0]) // '', $J, 'from the same job');
	is(qparams($results[0])->{locator} // '', $L // '', 'the first set asked is the committed locator');
	is(scalar(grep { is_query_start($_) } @$log), 0, 'no REST query during the resumed backfill')
	  or diag(join("\n", map { brief_entry($_) } grep { is_query_start($_) } @$log));
}
$st = status_of('acme', 'Contact');
is($st->{backfill_records}, $N + 1, 'status: backfill_records counts every record once');
is($st->{consecutive_failures}, 0, 'status: failures cleared');
compare_table('after the crash', 'acme.contact', $describe_fields, admin($A, 'GET', 'records/Contact'));

# ---------------------------------------------------------------------------
# 4. A Failed job: reported, then a new job (minimal quoting: empty unquoted = null)
# ---------------------------------------------------------------------------

admin($A, 'POST', 'bulk', { fail_next_job => 'INVALID_FIELD: simulated failure of the job', quote_all => JSON::PP::false });
admin($A, 'DELETE', 'requests');
admin($A, 'PATCH', "records/Contact/$ids[20]", { Description => qq{after "the" crash,\nand more} });
sql("SELECT sync.resync('acme', 'Contact')");
ok(wait_until(90, sub { (status_of('acme', 'Contact')->{last_error} // '') =~ /Bulk API query job \w+ of "Contact" ended Failed: INVALID_FIELD: simulated failure/ }),
	'the Failed job is reported in sync.status.last_error')
  or diag(status_of('acme', 'Contact')->{last_error});
is(sql("SELECT sync.wait_for_backfill('acme', 'Contact', '180s')"), 't', 'the backfill completes with a new job');
$log = backfill_part(log_of($A));
is(scalar(grep { is_bulk_create($_) } @$log), 2, 'two jobs created: the failed one and its replacement');
is(scalar(grep { is_query_more($_) } @$log), 0, 'no REST pages beyond the first');
$st = status_of('acme', 'Contact');
is($st->{consecutive_failures}, 0, 'status: recovered');
is($st->{backfill_records}, $N + 1, 'status: backfill_records');
compare_table('after a Failed job (minimal quoting)', 'acme.contact', $describe_fields, admin($A, 'GET', 'records/Contact'));

# ---------------------------------------------------------------------------
# 5. Under the threshold the REST query does it all
# ---------------------------------------------------------------------------

sql(q{SELECT sync.alter_source('acme', options => '{"bulk_threshold": 0}')});
admin($A, 'DELETE', 'requests');
sql("SELECT sync.resync('acme', 'Contact')");
is(sql("SELECT sync.wait_for_backfill('acme', 'Contact', '180s')"), 't', 'bulk_threshold 0: the backfill completes');
$log = log_of($A);
is(scalar(grep { is_bulk_create($_) } @$log), 0, 'bulk_threshold 0: no job');
cmp_ok(scalar(grep { is_query_more($_) } @$log), '>=', 4, 'bulk_threshold 0: REST pages');

# ---------------------------------------------------------------------------
# 6. A result set larger than sync.max_response_bytes is asked again with half the records
# ---------------------------------------------------------------------------

{
	my $jobs = admin($A, 'GET', 'bulk')->{jobs};
	my ($done) = grep { $_->{state} eq 'JobComplete' && $_->{records} } reverse @$jobs;
	my $row_bytes = $done ? $done->{bytes} / $done->{records} : 700;
	# 1500 rows do not fit, 750 do; a REST page of 200 records (JSON) fits too
	my $limit = int($row_bytes * 1100);
	note(sprintf('CSV rows of %.0f bytes: sync.max_response_bytes = %d', $row_bytes, $limit));
	sql("ALTER SYSTEM SET sync.max_response_bytes = $limit");
	sql('SELECT pg_reload_conf()');
	sql(q{SELECT sync.alter_source('acme', options => '{"bulk_threshold": 3000, "batch_size": 200}')});
	admin($A, 'POST', 'bulk', { quote_all => JSON::PP::true });
	admin($A, 'DELETE', 'requests');
	sleep 1;    # the worker reads the new setting at its next round
	sql("SELECT sync.resync('acme', 'Contact')");
	is(sql("SELECT sync.wait_for_backfill('acme', 'Contact', '180s')"), 't',
		'small sync.max_response_bytes: the backfill completes');
	$log = backfill_part(log_of($A));
	my @results = grep { defined bulk_result_job($_) } @$log;
	my @sizes = map { qparams($_)->{maxRecords} // '' } @results;
	my $half = $CHUNK / 2;
	my $sets = int(($N + 1 + $half - 1) / $half);
	is(scalar(grep { $_ == $half } @sizes), $sets, "$sets sets of maxRecords=$half") or diag("@sizes");
	is(scalar(grep { $_ == $CHUNK } @sizes[ 1 .. $#sizes ]), 0, "no later set asked with $CHUNK") or diag("@sizes");
	like(slurp_file($node->logfile), qr/exceed sync.max_response_bytes; asking for $half records a set/,
		'the server log says why');
	is(status_of('acme', 'Contact')->{backfill_records}, $N + 1, 'status: backfill_records');
	is(sql('SELECT count(*) FROM acme.contact'), $N + 1, 'every record is in the table');
	sql('ALTER SYSTEM RESET sync.max_response_bytes');
	sql('SELECT pg_reload_conf()');
}

done_testing();
