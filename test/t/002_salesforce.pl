# Salesforce sync against the fake org in test/fake_salesforce.py:
#   1. a paged backfill copies every record exactly (value by value, every column);
#   2. creates, updates, soft and hard deletes, undeletes and a 700-record bulk update
#      sharing one SystemModstamp all reach the table;
#   3. an access token expiring mid-backfill is refreshed transparently;
#   4. a server restart mid-backfill resumes from the stored cursor;
#   5. an expired query locator mid-backfill is survived;
#   6. errors (503s, a bad refresh token) are recorded and recovered from.
# Expected values are derived from the fake's own records, converted in Perl.
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
my $node;    # set up below; start_fake, admin, sql, wait_sql, status_of etc. are in SyncTest.pm

# ---------------------------------------------------------------------------
# Helpers: the fake's API and request log
# ---------------------------------------------------------------------------

# The describe of an object, fetched through the fake's public API with our own token.
sub api_describe
{
	my ($fake, $object) = @_;
	my $res = http()->post_form("$fake->{url}/services/oauth2/token",
		{ grant_type => 'refresh_token', client_id => 'test-client',
		  client_secret => 'test-secret', refresh_token => 'test-refresh' });
	die "token: $res->{status} $res->{content}" unless $res->{success};
	my $tok = $json->decode($res->{content});
	$res = http()->get("$tok->{instance_url}/services/data/v66.0/sobjects/$object/describe",
		{ headers => { Authorization => "Bearer $tok->{access_token}" } });
	die "describe: $res->{status} $res->{content}" unless $res->{success};
	return $json->decode($res->{content});
}

sub is_query_start { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/?$}; }
sub is_query_all   { return $_[0]->{path} =~ m{^/services/data/v[\d.]+/queryAll/?$}; }

# (locator, offset) of a nextRecordsUrl request, or ().
sub query_more
{
	return $_[0]->{path} =~ m{^/services/data/v[\d.]+/query/([A-Za-z0-9]+)-(\d+)$} ? ($1, $2) : ();
}

sub is_token { return $_[0]->{path} eq '/services/oauth2/token'; }

sub brief_entry
{
	my ($e) = @_;
	return "$e->{method} $e->{path} -> $e->{status}";
}

# ---------------------------------------------------------------------------
# Helpers: independent conversion of API values, and table comparison
# ---------------------------------------------------------------------------

# Seconds since the epoch of a Salesforce datetime ("2024-05-01T12:34:56.000+0000").
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

# The expected value of an API field, as a comparable string.
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

# The table's value (as rendered by json_agg, see select_expr) as a comparable string.
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

# Compare a synced table with the API's records, every column of every record.
# $pending: ids that may still be in the table (hard deletes not yet reported).
sub compare_table
{
	my ($label, $table, $fields, $expected, $pending) = @_;
	$pending //= {};
	my $rows = $json->decode(sql(
		"SELECT coalesce(json_agg(x ORDER BY x.\"Id\"), '[]') FROM (SELECT "
		  . join(', ', map { select_expr($_) } @$fields) . " FROM $table) x"));
	my ($n, $ndistinct) = split /\|/, sql("SELECT count(*), count(DISTINCT id) FROM $table");
	my %got = map { $_->{Id} => $_ } @$rows;
	my %exp = map { $_->{Id} => $_ } @$expected;
	my (@missing, @extra, @diff);
	my $values = 0;
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
			push @diff, "$id $f->{api_field} ($f->{type}): table $have, API $want" if $have ne $want;
		}
	}
	for my $id (sort keys %got)
	{
		push @extra, $id unless $exp{$id} || $pending->{$id};
	}
	my $expected_rows = scalar(@$expected) + scalar(grep { $got{$_} && !$exp{$_} } keys %$pending);
	is($n, $expected_rows, "$label: $expected_rows rows");
	is($ndistinct, $n, "$label: no id twice");
	is(scalar(@missing), 0, "$label: no API record missing from the table")
	  or diag("missing: @missing[0 .. ($#missing < 9 ? $#missing : 9)]");
	is(scalar(@extra), 0, "$label: no row the API does not have")
	  or diag("extra: @extra[0 .. ($#extra < 9 ? $#extra : 9)]");
	is(scalar(@diff), 0, "$label: all $values values equal the API's")
	  or diag(join("\n", @diff[0 .. ($#diff < 19 ? $#diff : 19)]));
	return \%got;
}

# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

is(sf_datetime_epoch('1970-01-01T00:00:00.000+0000'), 0, 'datetime helper: epoch 0');
is(sf_datetime_epoch('2024-05-01T12:34:56.789+0000'), 1714566896.789, 'datetime helper: a known instant');
is(sf_datetime_epoch('2024-05-01T14:34:56Z') - 7200, sf_datetime_epoch('2024-05-01T14:34:56+02:00'),
	'datetime helper: offsets');

my $A = start_fake('salesforce', 'a', '--records', 5000, '--seed', 1);
my $B = start_fake('salesforce', 'b', '--records', 4600, '--seed', 2);

$node = start_node(max_backoff => 4);    # and CREATE EXTENSION sync

# Field types from the fake's describe: the reference for the expected conversions.
my $describe = api_describe($A, 'Contact');
my %api_type = map { $_->{name} => $_->{type} } @{ $describe->{fields} };
my @visible = map { $_->{name} } grep { !$_->{deprecatedAndHidden} && $_->{name} ne 'IsDeleted' }
  @{ $describe->{fields} };

# ---------------------------------------------------------------------------
# 1. Backfill of 5000 Contacts in pages of 200
# ---------------------------------------------------------------------------

my $a_records = admin($A, 'GET', 'records/Contact');
is(scalar(@$a_records), 5000, 'fake A holds 5000 live Contacts');
{
	# Precondition: runs of one SystemModstamp span page boundaries of the backfill.
	my @sorted = sort { $a->{SystemModstamp} cmp $b->{SystemModstamp} || $a->{Id} cmp $b->{Id} } @$a_records;
	my $split = grep { $sorted[ $_ * 200 - 1 ]{SystemModstamp} eq $sorted[ $_ * 200 ]{SystemModstamp} }
	  1 .. int($#sorted / 200);
	cmp_ok($split, '>=', 2, "page boundaries fall inside runs of one SystemModstamp ($split of 24)");
}
admin($A, 'DELETE', 'requests');

sql("SELECT sync.create_source('acme', 'salesforce', '$A->{url}', '$creds', "
	  . "'{\"requests_per_second\": 50, \"batch_size\": 200, \"poll_interval\": 1}')");
is(sql("SELECT sync.add_collection('acme', 'Contact')"), 'acme.contact', 'add_collection creates acme.contact');
my $t_backfill = time;
is(sql("SELECT sync.wait_for_backfill('acme', 'Contact', '180s')"), 't', 'acme Contact backfill completes');
note(sprintf('backfill of 5000 records took %.1fs (at %s)', time - $t_backfill, elapsed()));

my $st = status_of('acme', 'Contact');
is($st->{state}, 'syncing', 'status: state syncing after the backfill');
is($st->{phase}, 'incremental', 'status: phase incremental');
is($st->{backfill_records}, 5000, 'status: backfill_records = 5000');
is($st->{backfill_total}, 5000, 'status: backfill_total = 5000');
ok(defined $st->{backfill_completed_at}, 'status: backfill_completed_at set');
is($st->{consecutive_failures}, 0, 'status: no failures');
ok(!defined $st->{last_error}, 'status: no error recorded');

# The columns: one per visible API field, typed as the API's type demands.
my $cols = $json->decode(sql(
	"SELECT json_agg(json_build_object('api_field', api_field, 'api_type', api_type, 'column_name', column_name, "
	  . "'column_type', column_type, 'is_key', is_key, 'is_version', is_version) ORDER BY position) "
	  . "FROM sync.columns WHERE source = 'acme' AND collection = 'Contact'"));
my @fields = map { { %$_, type => $api_type{ $_->{api_field} } // 'missing-from-describe' } } @$cols;
my %colname = map { $_->{api_field} => $_->{column_name} } @fields;
is(join(',', sort map { $_->{api_field} } @fields), join(',', sort @visible),
	'sync.columns lists every visible API field but IsDeleted');
is(join(',', sort map { $_->{api_field} } @fields),
	join(',', sort grep { $_ ne 'IsDeleted' } keys %{ $a_records->[0] }),
	'sync.columns matches the fields of the API records');
{
	my $actual = $json->decode(sql(
		"SELECT json_object_agg(attname, format_type(atttypid, atttypmod)) FROM pg_attribute "
		  . "WHERE attrelid = 'acme.contact'::regclass AND attnum > 0 AND NOT attisdropped"));
	my %fdesc = map { $_->{name} => $_ } @{ $describe->{fields} };
	my @bad;
	for my $f (@fields)
	{
		my $t = $f->{type};
		my $want =
		    $TEXT_TYPE{$t} ? 'text'
		  : $t eq 'multipicklist' ? 'text[]'
		  : $t eq 'boolean' ? 'boolean'
		  : $t eq 'int' ? 'integer'
		  : $NUMBER_TYPE{$t} ? "numeric($fdesc{$f->{api_field}}{precision},$fdesc{$f->{api_field}}{scale})"
		  : $t eq 'date' ? 'date'
		  : $t eq 'datetime' ? 'timestamp with time zone'
		  : $t eq 'time' ? 'time without time zone'
		  : $t eq 'address' ? 'jsonb'
		  : "?$t";
		my $have = $actual->{ $f->{column_name} } // 'no such column';
		push @bad, "$f->{api_field} ($t): $have, want $want" if $have ne $want;
		push @bad, "$f->{api_field}: sync.columns api_type $f->{api_type}" if $f->{api_type} ne $t;
	}
	is(scalar(@bad), 0, 'every column has the type its API field calls for') or diag(join("\n", @bad));
	is(sql("SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
		  . "AND a.attnum = ANY (i.indkey) WHERE i.indrelid = 'acme.contact'::regclass AND i.indisprimary"),
		'id', 'id is the primary key');
	is(join(',', map { $_->{api_field} } grep { $_->{is_version} } @fields), 'SystemModstamp',
		'SystemModstamp is the version column');
}

compare_table('backfill of acme.contact', 'acme.contact', \@fields, $a_records);

{
	my $log = admin($A, 'GET', 'requests');
	my @starts = grep { is_query_start($_) } @$log;
	is(scalar(@starts), 1, 'backfill ran one query') or diag(join("\n", map { brief_entry($_) } @starts));
	my $soql = @starts ? soql_of($starts[0]) : '';
	like($soql, qr/^SELECT (\w+,)*SystemModstamp(,\w+)* FROM Contact ORDER BY SystemModstamp, Id$/,
		'backfill query: every field, ordered by SystemModstamp, Id, no WHERE');
	my %offsets;
	my @bad_status = grep { $_->{status} != 200 } grep { is_query_start($_) || query_more($_) } @$log;
	for my $e (@$log)
	{
		my ($loc, $off) = query_more($e);
		push @{ $offsets{$loc} }, $off if defined $loc;
	}
	is(scalar(keys %offsets), 1, 'one query locator followed');
	my ($loc) = keys %offsets;
	is(join(',', @{ $offsets{ $loc // '' } // [] }), join(',', map { $_ * 200 } 1 .. 24),
		'nextRecordsUrl followed page by page: offsets 200..4800, each once, in order');
	is(scalar(@bad_status), 0, 'every backfill page answered 200');
}

# ---------------------------------------------------------------------------
# 2. Changes after the backfill
# ---------------------------------------------------------------------------

sql(q{SELECT sync.alter_source('acme', options => '{"deleted_interval": 1}')});
is(sql("SELECT options::text FROM sync.sources WHERE name = 'acme'"),
	'{"batch_size": 200, "poll_interval": 1, "deleted_interval": 1, "requests_per_second": 50}',
	'alter_source merges deleted_interval into the options');

my @ids = map { $_->{Id} } @$a_records;
my ($H1, $R1, $R2, $S1, $U1) = @ids[ 10, 20, 30, 40, 50 ];
my %special = map { $_ => 1 } ($H1, $R1, $R2, $S1, $U1);

# Hard delete first: getDeleted sees it only once its minute is over.
my $t_hard = time;
my $hd = admin($A, 'DELETE', "records/Contact/$H1?hard=1");
ok($hd->{hard}, 'hard-deleted a record in the fake');

my $account_id = admin($A, 'GET', 'records/Account')->[0]{Id};
my $N1 = admin($A, 'POST', 'records/Contact', {
	LastName => 'Neumann', FirstName => 'Anna', Email => 'anna@example.com',
	Interests__c => 'Sports;Travel;Art', Birthdate => '2000-01-01',
	Preferred_Contact_Time__c => '07:30:00.000Z', Lifetime_Value__c => 0.01,
	Engagement_Score__c => 0.5, Visit_Count__c => 2147483647, MailingCity => "Krak\x{f3}w",
	MailingLatitude => -33.86882, MailingLongitude => 151.209296, AccountId => $account_id,
	External_Key__c => 'NEW-1', EmailBouncedDate => '2023-12-31T23:59:59.999Z' })->{Id};
my $N2 = admin($A, 'POST', 'records/Contact', { LastName => 'Zwei' })->{Id};
my $N3 = admin($A, 'POST', 'records/Contact', { LastName => 'Drei', Salutation => 'Dr.', DoNotCall => JSON::PP::true })->{Id};

admin($A, 'PATCH', "records/Contact/$R1", {
	FirstName => "Zo\x{eb}", LastName => qq{D'Arcy "Quoted" \\ \x{d1}}, Email => 'zoe.new@example.com',
	Title => "\x{dc}n\x{ef}c\x{f6}d\x{e9} \x{2014} \x{1f389}", Birthdate => '1980-02-29',
	Interests__c => [ 'Music', 'Food & Wine' ], Preferred_Contact_Time__c => '23:59:59.123Z',
	Lifetime_Value__c => 1234.56, Engagement_Score__c => 99.9, Discount_Rate__c => 12.34,
	Visit_Count__c => -7, HasOptedOutOfEmail => JSON::PP::true, DoNotCall => JSON::PP::true,
	EmailBouncedDate => '2024-05-01T12:34:56.789Z', AccountId => undef,
	MailingStreet => "Bahnhofstrasse 1\nPostfach", MailingCity => "Z\x{fc}rich", MailingState => undef,
	MailingPostalCode => '8001', MailingCountry => 'Switzerland', MailingLatitude => 47.376887,
	MailingLongitude => 8.541694, MailingGeocodeAccuracy => 'Address',
	Description => qq{multi\nline\ttab "q" \\ back 'single'} });
admin($A, 'PATCH', "records/Contact/$R2", {
	FirstName => undef, Email => undef, Interests__c => undef, Birthdate => undef,
	Preferred_Contact_Time__c => undef, EmailBouncedDate => undef, Lifetime_Value__c => 0,
	Visit_Count__c => 0, HasOptedOutOfEmail => JSON::PP::false,
	map { ("Mailing$_" => undef) } qw(Street City State PostalCode Country Latitude Longitude GeocodeAccuracy) });
is(admin($A, 'GET', "records/Contact/$R2")->{MailingAddress}, undef, 'R2 has no address at all now');
admin($A, 'DELETE', "records/Contact/$S1");
admin($A, 'DELETE', "records/Contact/$U1");

my @bulk_ids = grep { !$special{$_} } @ids[ map { 100 + 6 * $_ } 0 .. 699 ];
my $bulk = admin($A, 'POST', 'bulk_update/Contact',
	{ ids => \@bulk_ids, fields => { Title => 'Bulk 700', Loyalty_Tier__c => 'Gold', Visit_Count__c => 700 } });
is(scalar(@{ $bulk->{ids} }), 700, 'bulk_update touched 700 records');
my %bulk_stamps = map { admin($A, 'GET', "records/Contact/$_")->{SystemModstamp} => 1 } @bulk_ids[ 0, 349, 699 ];
is(join(',', keys %bulk_stamps), $bulk->{SystemModstamp}, 'the 700 records share one SystemModstamp');

my %c = %colname;
ok(wait_sql(90, "SELECT (SELECT count(*) FROM acme.contact WHERE id IN ('$N1', '$N2', '$N3')) = 3 "
	  . "AND (SELECT $c{Email} FROM acme.contact WHERE id = '$R1') = 'zoe.new\@example.com' "
	  . "AND (SELECT $c{FirstName} IS NULL AND $c{MailingAddress} IS NULL FROM acme.contact WHERE id = '$R2') "
	  . "AND NOT EXISTS (SELECT 1 FROM acme.contact WHERE id IN ('$S1', '$U1')) "
	  . "AND (SELECT count(*) FROM acme.contact WHERE $c{Title} = 'Bulk 700' "
	  . "     AND $c{SystemModstamp} = '$bulk->{SystemModstamp}') = 700"),
	'creates, updates, soft deletes and the 700-record bulk update reach the table');
note('changes synced at ' . elapsed());

my $undel = admin($A, 'POST', "undelete/Contact/$U1");
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM acme.contact WHERE id = '$U1' "
	  . "AND $c{SystemModstamp} = '$undel->{SystemModstamp}')"), 'an undeleted record comes back');

admin($A, 'DELETE', "records/Contact/$N2?hard=1");
{
	my $log = admin($A, 'GET', 'requests');
	my %locs;
	for my $e (@$log)
	{
		my ($loc, $off) = query_more($e);
		$locs{$loc}++ if defined $loc && $e->{t} > $t_hard;
	}
	my ($max) = sort { $b <=> $a } values %locs;
	cmp_ok($max // 0, '>=', 3, 'polls read the bulk-updated second over several pages of 200');
}

# Everything but the two hard deletes (which wait for getDeleted) matches now.
$a_records = admin($A, 'GET', 'records/Contact');
compare_table('after changes (hard deletes pending)', 'acme.contact', \@fields, $a_records,
	{ $H1 => 1, $N2 => 1 });

# ---------------------------------------------------------------------------
# 3. An access token expiring mid-backfill (source beta on fake B)
# ---------------------------------------------------------------------------

my $b_records = admin($B, 'GET', 'records/Contact');
is(scalar(@$b_records), 4600, 'fake B holds 4600 live Contacts');
admin($B, 'DELETE', 'requests');
sql("SELECT sync.create_source('beta', 'salesforce', '$B->{url}', '$creds', "
	  . "'{\"requests_per_second\": 4, \"batch_size\": 200}')");
sql("SELECT sync.add_collection('beta', 'Contact')");
ok(wait_sql(60, "SELECT phase = 'backfill' AND backfill_records BETWEEN 400 AND 2400 FROM sync.status "
	  . "WHERE source = 'beta'"), 'beta: backfill under way');
my $expired = admin($B, 'POST', 'expire_tokens');
$st = status_of('beta', 'Contact');
ok($st->{phase} eq 'backfill' && $st->{backfill_records} < 4600,
	"beta: tokens expired mid-backfill ($st->{backfill_records} of 4600 records in)");
cmp_ok($expired->{expired}, '>=', 1, 'the fake revoked the token in use');
is(sql("SELECT sync.wait_for_backfill('beta', 'Contact', '120s')"), 't', 'beta: backfill completes');
$st = status_of('beta', 'Contact');
is($st->{backfill_records}, 4600, 'beta: backfill_records = 4600');
is($st->{backfill_total}, 4600, 'beta: backfill_total = 4600');
ok(!defined $st->{last_error} && $st->{consecutive_failures} == 0, 'beta: the refresh was no error')
  or diag("last_error: " . ($st->{last_error} // 'none'));
compare_table('beta.contact after a token expiry', 'beta.contact', \@fields, $b_records);
{
	my $log = admin($B, 'GET', 'requests');
	my @i401 = grep { $log->[$_]{status} == 401 } 0 .. $#$log;
	is(scalar(@i401), 1, 'one request met the expired token');
	for my $i (@i401)
	{
		my ($e, $tok, $retry) = @$log[ $i .. $i + 2 ];
		ok(scalar(query_more($e)), 'the 401 was on a nextRecordsUrl of the backfill');
		ok($tok && is_token($tok) && $tok->{method} eq 'POST' && $tok->{status} == 200,
			'the 401 is followed by a token refresh') or diag($tok ? brief_entry($tok) : 'nothing');
		ok($retry && $retry->{path} eq $e->{path} && $retry->{status} == 200,
			'and by the same request again, answered 200') or diag($retry ? brief_entry($retry) : 'nothing');
	}
}
sql("SELECT sync.pause('beta')");
# For section 7: a hard delete beta has not seen yet (its getDeleted runs every 300 s by default).
my $X = $b_records->[100]{Id};
my $x_deleted = admin($B, 'DELETE', "records/Contact/$X?hard=1")->{deletedDate};
$b_records = admin($B, 'GET', 'records/Contact');
my $nb = scalar(@$b_records);
is($nb, 4599, 'fake B holds 4599 live Contacts now');
note('section 3 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 5. An expired query locator mid-backfill (source gamma on fake B)
# ---------------------------------------------------------------------------

admin($B, 'DELETE', 'requests');
sql("SELECT sync.create_source('gamma', 'salesforce', '$B->{url}', '$creds', "
	  . "'{\"requests_per_second\": 4, \"batch_size\": 200}')");
sql("SELECT sync.add_collection('gamma', 'Contact')");
ok(wait_sql(60, "SELECT phase = 'backfill' AND backfill_records BETWEEN 400 AND 2400 FROM sync.status "
	  . "WHERE source = 'gamma'"), 'gamma: backfill under way');
my $expired_locs = admin($B, 'POST', 'expire_locators');
$st = status_of('gamma', 'Contact');
ok($st->{phase} eq 'backfill' && $st->{backfill_records} < $nb,
	"gamma: locators expired mid-backfill ($st->{backfill_records} of $nb records in)");
cmp_ok($expired_locs->{expired}, '>=', 1, 'the fake dropped the query locator in use');
is(sql("SELECT sync.wait_for_backfill('gamma', 'Contact', '120s')"), 't', 'gamma: backfill completes');
$st = status_of('gamma', 'Contact');
is($st->{backfill_records}, $nb, "gamma: backfill_records = $nb (nothing counted twice)");
is($st->{backfill_total}, $nb, "gamma: backfill_total = $nb");
ok(!defined $st->{last_error} && $st->{consecutive_failures} == 0, 'gamma: the expired locator was no error')
  or diag("last_error: " . ($st->{last_error} // 'none'));
compare_table('gamma.contact after an expired locator', 'gamma.contact', \@fields, $b_records);
{
	my $log = admin($B, 'GET', 'requests');
	my @i400 = grep { $log->[$_]{status} == 400 } 0 .. $#$log;
	is(scalar(@i400), 1, 'one request met the expired locator');
	for my $i (@i400)
	{
		my ($e, $next) = @$log[ $i, $i + 1 ];
		ok(scalar(query_more($e)), 'the 400 was on a nextRecordsUrl');
		ok($next && is_query_start($next) && $next->{status} == 200, 'then a new query ran')
		  or diag($next ? brief_entry($next) : 'nothing');
		like($next ? soql_of($next) : '',
			qr/ FROM Contact WHERE \(SystemModstamp > \S+ OR \(SystemModstamp = \S+ AND Id > '\w+'\)\) ORDER BY SystemModstamp, Id$/,
			'from the keyset of the last record applied');
	}
	like(slurp_file($node->logfile), qr/query locator of collection "Contact" expired/,
		'the server log tells of the expired locator');
}
sql("SELECT sync.pause('gamma')");
note('section 5 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 4. A server restart mid-backfill (source delta on fake B)
# ---------------------------------------------------------------------------

admin($B, 'DELETE', 'requests');
sql("SELECT sync.create_source('delta', 'salesforce', '$B->{url}', '$creds', "
	  . "'{\"requests_per_second\": 1.5, \"batch_size\": 200}')");
sql("SELECT sync.add_collection('delta', 'Contact')");
ok(wait_sql(90, "SELECT phase = 'backfill' AND backfill_records BETWEEN 1000 AND 3400 FROM sync.status "
	  . "WHERE source = 'delta'"), 'delta: backfill under way');
$st = status_of('delta', 'Contact');
ok($st->{backfill_records} > 0 && $st->{backfill_records} < ($st->{backfill_total} // 0),
	"delta: restarting with $st->{backfill_records} of " . ($st->{backfill_total} // '?') . ' records in');
$node->stop('fast');
my $t_mark = time;
$node->start;
is(sql("SELECT sync.wait_for_backfill('delta', 'Contact', '180s')"), 't', 'delta: backfill completes after the restart');
$st = status_of('delta', 'Contact');
is($st->{backfill_records}, $nb, "delta: backfill_records = $nb (no page counted twice, none skipped)");
is($st->{backfill_total}, $nb, "delta: backfill_total = $nb");
compare_table('delta.contact after a restart', 'delta.contact', \@fields, $b_records);
{
	my $log = admin($B, 'GET', 'requests');
	my @post = grep { $_->{t} >= $t_mark && !is_token($_) } @$log;
	my @data = grep { is_query_start($_) || query_more($_) } @post;
	my ($loc, $off) = @data ? query_more($data[0]) : ();
	ok(@data && (defined $off ? $off > 0 : soql_of($data[0]) =~ / WHERE /),
		'after the restart the backfill went on from its cursor')
	  or diag(@data ? brief_entry($data[0]) . ' ' . ($data[0]{query} // '') : 'no requests');
	is(scalar(grep { is_query_start($_) && soql_of($_) !~ / WHERE / } @post), 0,
		'after the restart the query did not start over');
	is(scalar(grep { is_query_start($_) && soql_of($_) !~ / WHERE / } @$log), 1, 'the backfill query ran once in all');
	my %seen;
	for my $e (@$log)
	{
		my ($l, $o) = query_more($e);
		$seen{$o}++ if defined $o && $e->{status} == 200;
	}
	is(join(',', sort { $a <=> $b } keys %seen), join(',', map { $_ * 200 } 1 .. 22),
		'every page 200..4400 fetched');
	cmp_ok((sort { $b <=> $a } values %seen)[0] // 0, '<=', 2, 'no page fetched more than twice');
}
sql("SELECT sync.pause('delta')");
note('section 4 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 7. A resync must not forget a hard delete that getDeleted has not reported yet
#    (source beta, paused since section 3, so the delete is still pending)
# ---------------------------------------------------------------------------

# getDeleted windows start on a whole minute: let the delete's minute pass first.
ok(wait_until(70, sub { int(time / 60) > int(sf_datetime_epoch($x_deleted) / 60) }),
	'the minute of the pending delete is over');
sql(q{SELECT sync.alter_source('beta', options => '{"requests_per_second": 50, "deleted_interval": 1}')});
sql("SELECT sync.resync('beta', 'Contact')");
my $t_resync = time;
sql("SELECT sync.resume('beta')");
is(sql("SELECT sync.wait_for_backfill('beta', 'Contact', '120s')"), 't', 'beta: resync backfill completes');
$st = status_of('beta', 'Contact');
is($st->{backfill_records}, $nb, "beta: the resync read the $nb records left");
note('section 7 (resync) started at ' . elapsed() . '; its delete check comes at the end');

# ---------------------------------------------------------------------------
# 6. Errors are recorded, and the worker recovers
# ---------------------------------------------------------------------------

my $pid = sql('SELECT sync.worker_pid()');
ok($pid =~ /^\d+$/, "the worker runs (pid $pid)");
admin($A, 'POST', 'faults', { path_regex => '^/services/data/v[0-9.]+/query', status => 503, count => 3 });
ok(wait_sql(60, "SELECT state = 'error' AND consecutive_failures > 0 AND last_error LIKE '%503%SERVER_UNAVAILABLE%' "
	  . "FROM sync.status WHERE source = 'acme'"), 'acme: a 503 shows as state error with the 503 in last_error');
ok(wait_sql(60, "SELECT state = 'syncing' AND consecutive_failures = 0 FROM sync.status WHERE source = 'acme'"),
	'acme: back to syncing after the faults');
my $faults = admin($A, 'GET', 'faults');
is(join(',', map { "$_->{hits}/$_->{remaining}" } @$faults), '3/0', 'all three 503s were served');
$st = status_of('acme', 'Contact');
like($st->{last_error} // '', qr/HTTP 503 SERVER_UNAVAILABLE/, 'last_error keeps the 503 for the record');
ok(defined $st->{last_error_at}, 'last_error_at set');
my $E1 = admin($A, 'POST', 'records/Contact', { LastName => 'After503', Email => 'e1@example.com' })->{Id};
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM acme.contact WHERE id = '$E1' AND $c{LastName} = 'After503')"),
	'acme: a new record syncs after recovery');
admin($A, 'DELETE', 'faults');

sql(q{SELECT sync.alter_source('acme', credentials => '{"client_id": "test-client", "client_secret": "test-secret", "refresh_token": "revoked"}')});
ok(wait_sql(60, "SELECT state = 'error' AND last_error LIKE '%invalid_grant%' FROM sync.status WHERE source = 'acme'"),
	'acme: a bad refresh token shows as state error with invalid_grant');
ok(scalar(grep { is_token($_) && $_->{status} == 400 } @{ admin($A, 'GET', 'requests') }),
	'the fake refused a token request');
my $E2 = admin($A, 'POST', 'records/Contact', { LastName => 'DuringOutage' })->{Id};
sql("SELECT sync.alter_source('acme', credentials => '$creds')");
ok(wait_sql(60, "SELECT state = 'syncing' AND consecutive_failures = 0 FROM sync.status WHERE source = 'acme'"),
	'acme: fixed credentials recover');
ok(wait_sql(60, "SELECT EXISTS (SELECT 1 FROM acme.contact WHERE id = '$E2')"),
	'acme: the record created during the outage syncs');
is(sql('SELECT sync.worker_pid()'), $pid, 'the same worker kept running through the errors');
note('section 6 done at ' . elapsed());

# ---------------------------------------------------------------------------
# 2 (end). Hard deletes via getDeleted, and the whole table once more
# ---------------------------------------------------------------------------

ok(wait_sql(180, "SELECT NOT EXISTS (SELECT 1 FROM acme.contact WHERE id IN ('$H1', '$N2'))"),
	sprintf('acme: hard deletes removed via getDeleted (%.0fs after the first)', time - $t_hard));
{
	my @gd = grep { $_->{path} =~ m{^/services/data/v[\d.]+/sobjects/Contact/deleted/?$} }
	  @{ admin($A, 'GET', 'requests') };
	ok(scalar(grep { $_->{status} == 200 } @gd), 'getDeleted was called') or diag(scalar(@gd) . ' calls');
	my @delete_log = grep { $_->{id} eq $H1 || $_->{id} eq $N2 } @{ admin($A, 'GET', 'delete_log') };
	is(scalar(@delete_log), 2, 'both hard deletes are in the fake delete log');
}
$a_records = admin($A, 'GET', 'records/Contact');
my $got = compare_table('acme.contact at the end', 'acme.contact', \@fields, $a_records);
ok(!$got->{$H1} && !$got->{$N2} && !$got->{$S1} && $got->{$U1} && $got->{$N1} && $got->{$E1},
	'deleted records are gone, undeleted and new ones present');
$st = status_of('acme', 'Contact');
is($st->{records_deleted}, 4, 'records_deleted counts the 4 rows deleted (2 soft, 2 hard)');
is($st->{state}, 'syncing', 'acme ends syncing');

# The resync's delete check: once getDeleted has run past the delete, the row must be gone.
ok(wait_until(180, sub {
		scalar(grep { $_->{t} > $t_resync && $_->{status} == 200
				  && $_->{path} =~ m{/sobjects/Contact/deleted/?$} } @{ admin($B, 'GET', 'requests') })
	}), 'beta: getDeleted ran after the resync');
{
	my ($gd) = grep { $_->{t} > $t_resync && $_->{path} =~ m{/sobjects/Contact/deleted/?$} }
	  @{ admin($B, 'GET', 'requests') };
	my $cursor = $json->decode(sql("SELECT cursor FROM sync.collection_state st JOIN sync.collections c "
		  . "ON c.id = st.collection_id JOIN sync.sources s ON s.id = c.source_id WHERE s.name = 'beta'"));
	my $present = sql("SELECT count(*) FROM beta.contact WHERE id = '$X'");
	my $gone = wait_sql(120, "SELECT NOT EXISTS (SELECT 1 FROM beta.contact WHERE id = '$X')");
	ok($gone, 'beta: a record hard-deleted before the resync is gone (the resync ends with a delete sweep)')
	  or diag("deleted at $x_deleted; first getDeleted after the resync asked for "
		  . urldecode($gd ? $gd->{query} : '') . '; cursor deleted_until '
		  . sprintf('%.0f', $cursor->{deleted_until} // 0) . ', rows present: ' . $present
		  . ', sweep: ' . ($cursor->{sweep} ? 'pending' : 'none'));
	ok(wait_sql(60, "SELECT last_sweep_at IS NOT NULL FROM sync.status WHERE source = 'beta'"),
		'beta: the status shows when the sweep completed');
}

note('total ' . elapsed());
$node->stop;
done_testing();
